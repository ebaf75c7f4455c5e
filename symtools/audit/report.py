"""Render an audit (the dict of :func:`symtools.audit.audit_model`): terminal table, JSON file, HTML folder.

Every writer works from the report dict alone (so a saved JSON can be rendered again) and writes
atomically: a JSON file goes to a temporary name in the same folder and is renamed over the target; an HTML
report is built in a temporary sibling folder and renamed into place only when every file is written.
An error half-way leaves the target as it was.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from symtools.errors import SymtoolsError

__all__ = ["MARKER", "PLOTS", "check_report_dir", "render_table", "write_html", "write_json"]

MARKER = "audit.json"  # a folder holding this file was written by us and may be replaced
PLOTS = {
    "rescale": ("hist_rescale.png", "Rescale imbalances |θ_in|² − |θ_out|² per layer"),
    "scale": ("hist_scale.png", "Scale norms |θ|² per layer"),
    "translation": ("hist_translation.png", "Translation sums Σθ per layer"),
}


# ----------------------------------------------------------------------------------------------------------
# terminal


def _verdict(d: dict) -> str:
    """PASS / FAIL / INCONCLUSIVE of an identity report or one of its families."""
    return (d.get("verdict") or ("pass" if d.get("pass") else "fail")).upper()


def _fmt(x: Any, spec: str = ".3g") -> str:
    if x is None:
        width = re.match(r"[<>^]?(\d*)", spec).group(1)
        return format("-", f">{width}") if width else "-"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        return format(x, spec)
    return str(x)


def _best_prediction(entry: dict) -> dict | None:
    preds = [p for p in entry.get("predictions", []) if p.get("kind") != "none"]
    if not preds:
        return None
    return max(preds, key=lambda p: max((q.get("max_ratio", 0.0) for q in p["quantities"].values()
                                         if q.get("available")), default=0.0))


def render_table(report: dict, max_rows: int | None = None) -> str:
    """Plain-text summary: identities per family, then one line per group set, then flags and notes."""
    lines = []
    ck = report.get("checkpoint") or {}
    m = report.get("model") or {}
    lines.append(f"audit of {ck.get('path', '(model in memory)')}"
                 + (f" (step {ck['step']})" if ck.get("step") is not None else "")
                 + f": {m.get('name', 'model')}, {m.get('parameters', 0):,} parameters, {m.get('dtype', '')}, "
                   f"batch {report.get('batch')}, loss {_fmt(report.get('loss'), '.6g')}")
    if report.get("init"):
        fv = report.get("function_vs_init") or {}
        lines.append(f"init: {report['init'].get('path') or '(given)'} at step {report['init'].get('step')}; "
                     f"loss {_fmt(fv.get('loss_init'), '.6g')} → {_fmt(fv.get('loss_now'), '.6g')}, "
                     f"logits changed by {_fmt(fv.get('logits_max_rel_change'), '.2e')} (relative)"
                     + (" — same function" if fv.get("same_function") else ""))
    h = report.get("hyper")
    if h:
        lines.append(f"hypothesis: {h['optimizer']} lr {_fmt(h['lr'])}, weight decay {_fmt(h['weight_decay'])}"
                     + (f", momentum {_fmt(h['momentum'])}" if h.get("momentum") else "")
                     + f", {h.get('steps')} steps" + (" (lr per step from the run's records)"
                                                      if h.get("lr_schedule") else "")
                     + (f" — from {h['source']}" if h.get("source") else ""))
    ident = report.get("identities")
    if ident:
        t = ident["tolerance"]
        lines.append(f"identities ({t['dtype']}; each group against its round-off bound "
                     f"{t.get('safety_factor', 0):g}·u·terms; ratio = |residual| / bound):")
        for fam, f in ident["families"].items():
            lines.append(f"  {fam:<12}{f['groups']:>7} groups  grad ratio {f['gradient'].get('max_ratio', 0):.2g}"
                         f"  Hess ratio {f['hessian'].get('max_ratio', 0):.2g}  {_verdict(f)}")
    else:
        lines.append("identities: not checked")
    head = (f"{'family':<12}{'layer':<34}{'groups':>7}{'mean':>11}{'std':>10}{'min':>11}{'max':>11}"
            f"{'Δ init max':>12}  prediction")
    lines.append(head)
    layers = report.get("layers", [])
    shown = layers if max_rows is None else layers[:max_rows]
    for e in shown:
        c = e.get("charge") or {}
        vi = e.get("vs_init")
        dmax = None
        if vi:
            dmax = max(abs(vi["delta"].get("min", 0.0)), abs(vi["delta"].get("max", 0.0)))
        p = _best_prediction(e)
        if p is None:
            none = next((x for x in e.get("predictions", []) if x.get("kind") == "none"), None)
            ptxt = "-" if none is None else "none"
        else:
            ratios = {q: v.get("max_ratio") for q, v in p["quantities"].items() if v.get("available")}
            ptxt = p["kind"] + " " + ", ".join(f"{q} {r:.2g}×tol" for q, r in ratios.items())
        flag = "  FLAGGED" if e.get("flagged") else ""
        layer = e["layer"] if len(e["layer"]) <= 33 else e["layer"][:30] + "…"
        lines.append(f"{e['family']:<12}{layer:<34}{e['groups']:>7}{_fmt(c.get('mean'), '>11.3g')}"
                     f"{_fmt(c.get('std'), '>10.3g')}{_fmt(c.get('min'), '>11.3g')}{_fmt(c.get('max'), '>11.3g')}"
                     f"{_fmt(dmax, '>12.3g')}  {ptxt}{flag}")
    if max_rows is not None and len(layers) > max_rows:
        lines.append(f"… {len(layers) - max_rows} more group sets (see the JSON/HTML report)")
    lines += _matrix_charge_lines(report)
    for f in report.get("flagged", []):
        lines.append(f"FLAGGED {f['family']} {f['layer']}: {f['reason']}")
    seen = set()
    for e in layers:
        for p in e.get("predictions", []):
            if p.get("kind") == "none" and p.get("note") and p["note"] not in seen:
                seen.add(p["note"])
                lines.append(f"note ({e['family']}): {p['note']}")
    for n in report.get("notes", []):
        lines.append(f"note: {n}")
    secs = report.get("seconds", {})
    verdict = "PASS" if report.get("pass") else "FAIL"
    lines.append(f"{verdict}: {len(report.get('flagged', []))} group sets flagged"
                 + ("" if not ident else f", identities {_verdict(ident).lower()}"
                    + (" (rerun with --dtype float64)" if ident.get("verdict") == "inconclusive" else ""))
                 + f" ({secs.get('total', 0.0):.1f} s)")
    return "\n".join(lines)


def _matrix_charge_lines(report: dict) -> list[str]:
    """One line per matrix group set (``report["matrix_charges"]``, from
    :func:`symtools.audit.charges.matrix_group_charges`): its conserved charge components' range, or why it has
    no charge."""
    lines = []
    for mc in report.get("matrix_charges") or []:
        head = f"matrix charge {mc['family']} {_short(mc['layer'], 34)} ({mc['groups']} groups, {mc['algebra']})"
        c = mc.get("charge") or {}
        if not mc.get("has_charge"):
            lines.append(f"{head}: none — {mc.get('reason') or 'the derivation found no charge'}")
        elif c.get("count"):
            lines.append(f"{head}: {c['count']} conserved components in [{_fmt(c['min'])}, {_fmt(c['max'])}], "
                         f"mean {_fmt(c['mean'])}")
        else:
            lines.append(f"{head}: no conserved component on this subalgebra")
    return lines


# ----------------------------------------------------------------------------------------------------------
# files


def write_json(report: dict, path: str | os.PathLike) -> None:
    """Write the report as JSON, atomically (temporary file in the same folder, then ``os.replace``)."""
    path = Path(path)
    if path.is_dir():
        raise SymtoolsError(f"--json {path} is a directory; give a file name")
    if not path.parent.exists():
        raise SymtoolsError(f"--json {path}: folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=1, allow_nan=False)
            fh.write("\n")
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_report_dir(path: str | os.PathLike) -> Path:
    """Validate ``--report DIR`` before any work: its parent exists; DIR is absent, empty, or one of our reports."""
    path = Path(path)
    if not path.parent.exists():
        raise SymtoolsError(f"--report {path}: folder {path.parent} does not exist")
    if path.exists():
        if not path.is_dir():
            raise SymtoolsError(f"--report {path} exists and is not a folder")
        if any(path.iterdir()) and not (path / MARKER).exists():
            raise SymtoolsError(f"--report {path} is a non-empty folder that is not an audit report; choose a new "
                                f"name (an earlier report, holding {MARKER}, would be replaced)")
    return path


def write_html(report: dict, path: str | os.PathLike) -> Path:
    """Write ``DIR/index.html``, its PNG plots and ``DIR/audit.json``; atomically (temp folder, then rename)."""
    path = check_report_dir(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        images = _plots(report, tmp)
        (tmp / "index.html").write_text(_html(report, images), encoding="utf-8")
        write_json(report, tmp / MARKER)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _diagonal_scatter(plt, path, fams, title: str, xlabel: str, ylabel: str, points) -> None:
    """One panel per family: the (x, y, flagged) point sets ``points(family)`` against the line y = x
    (red: flagged layers)."""
    fig, axes = plt.subplots(1, len(fams), figsize=(3.6 * len(fams), 3.2), squeeze=False)
    for ax, fam in zip(axes.flat, fams):
        for x, y, flagged in points(fam):
            ax.plot(x, y, ".", ms=2, alpha=0.5, color="#c00000" if flagged else "#4472c4")
        ax.set_title(f"{fam}: {title}", fontsize=8)
        ax.set_xlabel(xlabel, fontsize=7)
        ax.set_ylabel(ylabel, fontsize=7)
        ax.tick_params(labelsize=6)
        lo, hi = ax.get_xlim()
        ax.plot([lo, hi], [lo, hi], color="gray", lw=0.5)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.16, top=0.9, wspace=0.35)
    fig.savefig(path, dpi=80)
    plt.close(fig)

def _plots(report: dict, folder: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out = []
    layers = report.get("layers", [])
    fams = list(dict.fromkeys(e["family"] for e in layers if e.get("values")))
    for fam in fams:
        entries = [e for e in layers if e["family"] == fam and e.get("values")]
        fname, title = PLOTS.get(fam, (f"hist_{fam}.png", f"{fam} charges per layer"))
        cols = min(4, len(entries))
        rows = math.ceil(len(entries) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
        for ax, e in zip(axes.flat, entries):
            vals = e["values"]
            bins = min(40, max(5, int(math.sqrt(len(vals)))))
            ax.hist(vals, bins=bins, histtype="stepfilled", color="#4472c4")  # one patch per histogram: fast
            init = (e.get("vs_init") or {}).get("init_values")
            if init:
                ax.hist(init, bins=bins, histtype="step", color="#c00000", label="init")
            ax.set_title(_short(e["layer"]) + ("  [flagged]" if e.get("flagged") else ""), fontsize=7,
                         color="#c00000" if e.get("flagged") else "black")
            ax.tick_params(labelsize=6)
        for ax in list(axes.flat)[len(entries):]:
            ax.axis("off")
        fig.suptitle(title + (" (outline: init)" if any((e.get("vs_init") or {}).get("init_values") for e in entries)
                              else ""), fontsize=9)
        fig.subplots_adjust(left=0.06, right=0.98, bottom=0.06, top=1 - 0.45 / (2.4 * rows), hspace=0.55, wspace=0.3)
        fig.savefig(folder / fname, dpi=80)
        plt.close(fig)
        out.append((fname, title))
    if any(e.get("vs_init") for e in layers):
        _diagonal_scatter(plt, folder / "charge_vs_init.png", fams, "charge now vs init", "init", "now",
                          lambda fam: [(e["vs_init"]["init_values"], e["values"], e.get("flagged")) for e in layers
                                       if e["family"] == fam and e.get("vs_init")])
        out.append(("charge_vs_init.png", "Charge now vs its initial value (red: flagged layers; line: unchanged)"))
    pred_fams = [f for f in fams if any(_best_prediction(e) for e in layers if e["family"] == f)]
    if pred_fams:
        def predicted_points(fam):
            for e in layers:
                p = _best_prediction(e) if e["family"] == fam else None
                q = (p or {}).get("quantities", {}).get("Q")
                if q and q.get("available"):
                    yield q["predicted"], q["actual"], e.get("flagged")

        _diagonal_scatter(plt, folder / "charge_vs_prediction.png", pred_fams, "charge vs prediction", "predicted",
                          "checkpoint", predicted_points)
        out.append(("charge_vs_prediction.png", "Charge at the checkpoint vs the law's prediction "
                                                "(lower bounds: the checkpoint must lie above the line)"))
        judged = [(e, _best_prediction(e)) for e in layers]
        judged = [(e, p) for e, p in judged if p is not None]
        fig, ax = plt.subplots(figsize=(max(4.0, 0.28 * len(judged) + 1.5), 3.4))
        ratios = [max([q.get("max_ratio", 0.0) for q in p["quantities"].values() if q.get("available")] or [0.0])
                  for _, p in judged]
        ax.bar(range(len(judged)), [max(r, 1e-6) for r in ratios],
               color=["#c00000" if r > 1 else "#4472c4" for r in ratios])
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(judged)))
        ax.set_xticklabels([f"{e['family'][:5]} {_short(e['layer'], 34)}" for e, _ in judged], rotation=90, fontsize=5)
        ax.set_ylabel("max |deviation| / tolerance", fontsize=7)
        ax.tick_params(axis="y", labelsize=6)
        fig.subplots_adjust(left=0.12, right=0.98, bottom=0.55, top=0.95)
        fig.savefig(folder / "deviation_ratio.png", dpi=80)
        plt.close(fig)
        out.append(("deviation_ratio.png", "Largest deviation from the prediction per group set, in units of its "
                                           "round-off tolerance (above 1: flagged)"))
    return out


def _short(label: str, n: int = 44) -> str:
    return label if len(label) <= n else label[: n - 1] + "…"


def _table(rows: Iterable[list[str]], head: list[str]) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _html(report: dict, images: list[tuple[str, str]]) -> str:
    e = html.escape
    verdict = "PASS" if report.get("pass") else "FAIL"
    parts = [
        "<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>symtools audit — {e(verdict)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:80em}table{border-collapse:collapse;font-size:0.85em}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}td:nth-child(2){text-align:left}"
        ".flag{color:#c00000;font-weight:bold}pre{background:#f6f6f6;padding:1em;overflow-x:auto}</style>",
        "</head><body>",
        f"<h1>symtools audit: <span class='{'flag' if verdict == 'FAIL' else ''}'>{verdict}</span></h1>",
        f"<pre>{e(render_table(report, max_rows=0))}</pre>",
    ]
    ident = report.get("identities")
    if ident:
        rows = [[e(f), str(v["groups"]), f"{v['gradient'].get('max_ratio', 0):.2g}",
                 f"{v['hessian'].get('max_ratio', 0):.2g}",
                 _verdict(v) if v["pass"] else f"<span class='flag'>{_verdict(v)}</span>"]
                for f, v in ident["families"].items()]
        parts.append("<h2>Identities</h2>" + _table(rows, ["family", "groups", "gradient max ratio",
                                                          "Hessian max ratio", ""]))
    rows = []
    for L in report.get("layers", []):
        c = L.get("charge") or {}
        p = _best_prediction(L)
        ptxt = "-"
        if p is not None:
            ptxt = e(p["kind"]) + ": " + ", ".join(f"{q} {v['max_ratio']:.2g}×tol" for q, v in p["quantities"].items()
                                                   if v.get("available"))
        vi = L.get("vs_init")
        rows.append([e(L["family"]), e(L["layer"]), str(L["groups"]), _fmt(c.get("mean")), _fmt(c.get("std")),
                     _fmt(c.get("min")), _fmt(c.get("max")),
                     _fmt(vi["delta"].get("max")) if vi else "-", ptxt,
                     "<span class='flag'>" + e("; ".join(L["reasons"])) + "</span>" if L.get("flagged") else ""])
    parts.append("<h2>Charges per layer</h2>" + _table(rows, ["family", "layer", "groups", "mean", "std", "min", "max",
                                                              "max Δ vs init", "prediction", "flag"]))
    for fname, title in images:
        parts.append(f"<h2>{e(title)}</h2><p><img src='{e(fname)}' alt='{e(title)}'></p>")
    parts.append("<p>Full data: <a href='audit.json'>audit.json</a> (schema: docs/commands/audit.md).</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
