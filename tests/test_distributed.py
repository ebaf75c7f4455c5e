"""The monitor under DistributedDataParallel: 2 gloo ranks on CPU write the records of one process.

Two processes (this file run as a script, ``torch.distributed`` initialised from ``MASTER_ADDR=127.0.0.1``
and a free ``MASTER_PORT``, gloo backend) each wrap the same float64 CNN in ``DistributedDataParallel`` and
train it with a :class:`~symtools.numeric.monitor.Monitor` for 4 heavy-ball SGD steps, each rank on its
half of a fixed global batch of 12. One process trains the same model on the whole global batch. DDP
averages the two half-batch gradients before ``optimizer.step()``, so both runs take the same steps up to
the order of the sums: the gradients differ by a few ulps (≈1e-16 relative), and 4 steps at lr 0.05 keep
that size. Records and weights are compared with rtol 1e-12 against the largest value of their stream
(a group's charge can cancel, e.g. a translation sum of signed weights, so its own size is no scale for
round-off); the per-step and accumulated law residuals are round-off themselves (≈1e-16) and need only
stay below 1e-12 in both runs; the continuous theory's residual, already relative, may differ by 1e-12.

The model has no BatchNorm: under DDP each rank normalises with the statistics of its own half batch,
so a BN model trains differently from one process on the global batch; ``SyncBatchNorm`` would fix that
but refuses CPU tensors (ValueError "SyncBatchNorm expected input tensor to be on GPU ..."; the worker
checks that it still does). Negative control: one process on rank 0's half batch alone misses the DDP
records by far more than the tolerance.

Only rank 0 writes (records, checkpoints with the model's own state_dict keys, the monitor's state,
summary.json): a second writer would double every record row, which the row counts would show.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from symtools.nn.graph import find_symmetries
from symtools.nn.small import cnn
from symtools.numeric.monitor import Monitor
from symtools.numeric.records import list_streams, read_stream
from symtools.training import load_checkpoint, train

STEPS, GLOBAL_BATCH, WORLD = 4, 12, 2
RTOL = 1e-12  # reassociated float64 sums (see the module docstring)
STREAMS = ("laws", "groups_rescale", "groups_translation", "train")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = cnn(3, [4, 6], 5, 8)  # conv → relu → pool, twice, then Linear: rescale and translation groups
    with torch.no_grad():  # non-zero biases, so that the translation sums are not trivially 0
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.double()


def _global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=g, dtype=torch.float64),
             torch.randint(0, 5, (GLOBAL_BATCH,), generator=g)) for _ in range(STEPS)]


def _shard(batches, rank: int, world: int):
    n = GLOBAL_BATCH // world
    return [(x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]) for x, y in batches]


def _train(model, wrapped, batches, out_dir: Path) -> dict:
    monitor = Monitor(find_symmetries(model, batches[0][0][:1]), stride=2)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.05, weight_decay=5e-3, momentum=0.9)
    return train(wrapped, opt, batches, STEPS, out_dir=out_dir, callbacks=[monitor], progress=False,
                 checkpoint_every=2)


def _worker(rank: int, world: int, out_dir: Path, result_dir: Path) -> None:
    """One DDP rank (run as ``python tests/test_distributed.py RANK WORLD OUT_DIR RESULT_DIR``)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)  # env://: MASTER_ADDR, MASTER_PORT
    try:
        model = _model()
        ddp = DistributedDataParallel(model)
        summary = _train(model, ddp, _shard(_global_batches(), rank, world), out_dir)
        try:  # SyncBatchNorm in train mode with an initialised process group, on CPU
            torch.nn.SyncBatchNorm(3).double()(torch.randn(4, 3, 2, 2, dtype=torch.float64))
            sync_bn = "ran on CPU"
        except ValueError as exc:
            sync_bn = str(exc)
        torch.save(model.state_dict(), result_dir / f"weights_{rank}.pt")
        keys = ("status", "steps", "final_loss", "max_rel_residual_discrete", "max_rel_residual_accumulated",
                "max_rel_residual_continuous")
        (result_dir / f"summary_{rank}.json").write_text(json.dumps(
            {"summary": {k: summary[k] for k in keys}, "sync_bn": sync_bn}))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _close(a: np.ndarray, b: np.ndarray, what: str, scale: float | None = None) -> None:
    """``a`` and ``b`` agree to RTOL of ``scale`` (default: their largest absolute value)."""
    assert a.shape == b.shape, (what, a.shape, b.shape)
    scale = max(np.abs(a).max(), np.abs(b).max()) if scale is None else scale
    worst = np.abs(a - b).max()
    assert worst <= RTOL * scale, f"{what}: differs by {worst:.3g}, more than {RTOL:g} × {scale:.3g}"


def _compare_records(ddp_dir: Path, single_dir: Path) -> None:
    for name in STREAMS:
        cols, a = read_stream(ddp_dir, name)
        cols_b, b = read_stream(single_dir, name)
        # laws and groups_* start with a step-0 row (initial charges; NaN residuals), train does not
        expected = {"train": STEPS, "laws": STEPS + 1}.get(name, STEPS // 2 + 1)
        assert cols == cols_b and a.shape[0] == b.shape[0] == expected, (name, a.shape, b.shape)
        if name != "train":
            step = cols.index("step")
            assert a[0, step] == 0 and b[0, step] == 0, name
            a, b = a[1:], b[1:]
        roundoff = [i for i, c in enumerate(cols) if c.endswith(("|residual_step", "|residual_accumulated"))]
        continuous = [i for i, c in enumerate(cols) if c.endswith("|residual_continuous")]
        values = [i for i, c in enumerate(cols) if i not in roundoff + continuous and c != "time_s"]
        _close(a[:, values], b[:, values], name)
        if roundoff:
            assert (a[:, roundoff] < 1e-12).all() and (b[:, roundoff] < 1e-12).all(), name
            _close(a[:, continuous], b[:, continuous], f"{name} continuous residuals", scale=1.0)


def test_ddp_on_two_gloo_ranks_writes_the_records_of_one_process(tmp_path):
    ddp_dir, result_dir = tmp_path / "ddp", tmp_path / "results"
    result_dir.mkdir()
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH")])))
    procs = [subprocess.Popen([sys.executable, __file__, str(rank), str(WORLD), str(ddp_dir), str(result_dir)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(WORLD)]
    try:
        # meanwhile, the reference: one process on the whole global batch, and a negative control
        model = _model()
        single = _train(model, model, _global_batches(), tmp_path / "single")
        half = _model()
        _train(half, half, _shard(_global_batches(), 0, WORLD), tmp_path / "half")
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{out}"

    # the same records as one process on the global batch, written once (row counts checked per stream)
    assert list_streams(ddp_dir / "records") == list_streams(tmp_path / "single" / "records")
    assert set(STREAMS) <= set(list_streams(ddp_dir / "records"))
    _compare_records(ddp_dir / "records", tmp_path / "single" / "records")
    assert sorted(os.listdir(ddp_dir / "checkpoints")) == sorted(os.listdir(tmp_path / "single" / "checkpoints"))
    assert sorted(os.listdir(ddp_dir / "monitor")) == sorted(os.listdir(tmp_path / "single" / "monitor"))
    assert json.loads((ddp_dir / "summary.json").read_text())["steps"] == STEPS

    # weights: bit-identical on the two ranks (DDP), equal to the single process's to round-off
    w = [torch.load(result_dir / f"weights_{r}.pt", weights_only=True) for r in range(WORLD)]
    for k, v in model.state_dict().items():
        assert torch.equal(w[0][k], w[1][k]), k
        assert torch.allclose(w[0][k], v, rtol=0, atol=RTOL * float(v.abs().max())), k
    # checkpoints keep the model's own keys (no "module." prefix) and the final weights
    ckpt = load_checkpoint(ddp_dir / "checkpoints" / f"step_{STEPS:06d}.pt")
    assert list(ckpt["model"]) == list(model.state_dict())
    assert all(torch.equal(ckpt["model"][k], w[0][k]) for k in w[0])

    # every rank computed the same monitor figures; they are round-off-sized, like the single process's
    results = [json.loads((result_dir / f"summary_{r}.json").read_text()) for r in range(WORLD)]
    assert results[0]["summary"] == results[1]["summary"]
    assert results[0]["summary"]["status"] == "completed"
    assert results[0]["summary"]["max_rel_residual_discrete"] < 1e-12
    assert single["max_rel_residual_discrete"] < 1e-12
    assert abs(results[0]["summary"]["final_loss"] - single["final_loss"]) <= RTOL * abs(single["final_loss"])
    # SyncBatchNorm is no way out on CPU: it refuses CPU tensors under an initialised process group
    assert "expected input tensor to be on GPU" in results[0]["sync_bn"]

    # negative control: one process on rank 0's half batch misses the DDP records by far more than RTOL
    cols, a = read_stream(ddp_dir / "records", "groups_rescale")
    _, c = read_stream(tmp_path / "half" / "records", "groups_rescale")
    measured = [i for i, col in enumerate(cols) if col.startswith("measured|")]
    assert np.abs(a[:, measured] - c[:, measured]).max() > 1e-6 * np.abs(a[:, measured]).max()


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
