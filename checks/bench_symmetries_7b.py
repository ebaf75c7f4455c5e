"""How long ``symmetries`` takes on a Llama-7B-sized config (issue target: < 60 s on 2 cores).

The model is built with its parameters on the meta device (``symtools.nn.hf.from_config(..., empty=True)``: no
memory for the 6.7 B weights; the rotary buffer stays real, so the rotary commutant is derived as for a small
model) and walked on 8 tokens, exactly as ``symtools symmetries --hf-config`` does. Prints the phases' times and
the counts per family, and checks the counts against the closed forms of docs/architectures/transformers.md.

    python checks/bench_symmetries_7b.py [--layers 32] [--json out/bench_symmetries_7b.json] [--doc docs/benchmarks.md]

``--doc`` rewrites the section "Symmetries of a Llama-7B-sized config" of docs/benchmarks.md with this run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--doc", type=Path, default=None, help="rewrite this run's section of docs/benchmarks.md")
    args = ap.parse_args()
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from benchdoc import machine, write_section

    info = machine(versions={"transformers": __import__("transformers").__version__})
    t0 = time.perf_counter()
    import torch
    import transformers

    from symtools.nn.graph import find_symmetries
    from symtools.nn.hf import from_config

    t_import = time.perf_counter() - t0
    d, f, heads, kv, L, vocab = 4096, 11008, 32, 32, args.layers, 32000
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=f, num_hidden_layers=L,
                                   num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096)
    t = time.perf_counter()
    model = from_config(cfg, empty=True)
    t_build = time.perf_counter() - t
    t = time.perf_counter()
    found = find_symmetries(model, torch.zeros(1, 8, dtype=torch.long, device="meta"))
    t_walk = time.perf_counter() - t
    fam = found.families()
    dims = {ms.family: 0 for ms in found.matrix_sets}
    counts = {ms.family: 0 for ms in found.matrix_sets}
    for ms in found.matrix_sets:
        counts[ms.family] += ms.count
        per = ms.algebra.shape[0] if ms.algebra is not None else (heads and (d // heads) ** 2)
        dims[ms.family] += ms.count * per
    dh = d // heads
    expected = {"scale": 1, "rescale": (2 * L + 1) * d + L * f, "translation": d}
    expected_matrix = {"attention_vo": L * kv, "attention_qk": L * kv}
    ok = fam == expected and counts == expected_matrix and dims.get("attention_qk") == L * kv * dh
    result = {"layers": L, "parameters": sum(p.numel() for p in model.parameters()), "import_s": round(t_import, 2),
              "build_s": round(t_build, 2), "symmetries_s": round(t_walk, 2),
              "total_s": round(time.perf_counter() - t0, 2), "families": fam, "matrix_groups": counts,
              "matrix_dimensions": dims, "counts_match_closed_forms": ok}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.doc:
        rows = "\n".join(f"| {k} | {counts.get(k, fam.get(k))} | {dims.get(k, fam.get(k)):,} |"
                         for k in ("scale", "rescale", "translation", "attention_vo", "attention_qk"))
        body = (f"| phase | seconds |\n|---|---|\n| import symtools + transformers | {t_import:.2f} |\n"
                f"| build ({result['parameters']:,} parameters on meta) | {t_build:.2f} |\n"
                f"| export + walk + attention heads (rotary commutant) | **{t_walk:.2f}** |\n"
                f"| total | {result['total_s']:.2f} |\n\n| family | groups | Lie algebra dimension |\n|---|---|---|\n"
                f"{rows}\n\nCounts equal the closed forms of docs/architectures/transformers.md: {ok}.")
        intro = (f"`python checks/bench_symmetries_7b.py --doc docs/benchmarks.md`: `find_symmetries` on a "
                 f"Llama-7B-sized config ({L} layers, d = {d}, MLP {f}, {heads} heads, vocabulary {vocab}), "
                 f"parameters on the meta device, 8 tokens, one run (target: under 60 s on 2 cores).")
        write_section(args.doc, "Symmetries of a Llama-7B-sized config", intro, info, body)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
