"""DistributedDataParallel under torchrun: 2 gloo ranks on the CPU, 32x32 scenes, the toy conv net."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from langseg.data import build_dataset
from langseg.train import evaluate, fit, load_config
from langseg.train.tasks import build_toy_semantic

pytestmark = pytest.mark.usefixtures("one_thread")


WORKER = textwrap.dedent(
    """
    import sys
    import torch
    import torch.distributed as dist
    from langseg.data import build_dataset
    from langseg.distributed import init_distributed
    from langseg.train import evaluate, fit, load_config
    from langseg.train.tasks import build_toy_semantic

    config = load_config(None, sys.argv[2:])
    info = init_distributed("cpu")  # our own group: fit() uses it and leaves it open
    module = fit(config).module
    # Evaluate again after training, to inspect the reduced counts, not only the logged ratios.
    val = build_dataset(config.val_data.name, config.val_data.kwargs)
    scores = evaluate(module, val, build_toy_semantic(config).evaluate, config.val_data, info)
    state = {"params": module.state_dict(), "confusion": scores.confusion}
    torch.save(state, f"{sys.argv[1]}/rank{info.rank}.pt")
    dist.barrier()  # as shutdown_distributed does: no rank tears down gloo while another still works
    dist.destroy_process_group()
    """
)

SETTINGS = [
    "device=cpu",
    "progress=false",
    "data.kwargs={num_scenes: 12, size: 32, granularity: colour}",
    "data.scale_range=[1, 1]",  # no padding: every sample has the same number of labelled pixels
    "model_kwargs={width: 8, dropout: 0.0}",
    "optim.lr=0.05",
    "max_steps=4",
    "checkpoint_every=2",
    "log_every=2",
    "val_data={name: shapeworld-semantic, kwargs: {num_scenes: 5, seed: 1, size: 32, granularity: colour}}",
]


def test_two_ranks_stay_identical_and_match_one_process(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "ddp"
    out.mkdir()
    # 2 ranks x batch 1 x 2 accumulated micro-batches (exercising no_sync) = a global batch of 4.
    ddp_args = [f"out_dir={out}", *SETTINGS, "data.batch_size=1", "grad_accum_steps=2"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, str(script), str(out), *ddp_args], env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    rank0, rank1 = ranks[0]["params"], ranks[1]["params"]
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name

    # Only rank 0 writes checkpoints; they carry both ranks' RNG states.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002.pt", "step_00000004.pt"]
    saved = torch.load(out / "checkpoints" / "step_00000004.pt", weights_only=True)
    assert saved["layout"]["world_size"] == 2 and len(saved["rng"]) == 2
    assert not torch.equal(saved["rng"][0]["torch"], saved["rng"][1]["torch"])  # per-rank streams
    for name in rank0:
        assert torch.equal(saved["model"][name], rank0[name])

    # The same global batches in one process give the same weights (up to summation order).
    single = fit(load_config(None, [f"out_dir={tmp_path / 'single'}", *SETTINGS, "data.batch_size=4"]))
    initial = build_toy_semantic(load_config(None, SETTINGS)).module.state_dict()
    for name, value in single.module.state_dict().items():
        torch.testing.assert_close(rank0[name], value, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(rank0["head.weight"], initial["head.weight"])

    # Evaluation sharded 3/2 over the ranks and summed with all_reduce = one pass over all 5 scenes.
    lines = (out / "metrics.jsonl").read_text().splitlines()
    logged = [r for r in map(json.loads, lines) if r["kind"] == "eval"][-1]
    config = load_config(None, SETTINGS)
    parts = build_toy_semantic(config)
    parts.module.load_state_dict(rank0)
    val = build_dataset(config.val_data.name, config.val_data.kwargs)
    scores = evaluate(parts.module, val, parts.evaluate, config.val_data)
    assert int(scores.confusion.sum()) == 5 * 32 * 32
    for rank in ranks:  # every pixel counted once, and every rank holds the global sums
        assert torch.equal(rank["confusion"], scores.confusion)
    assert logged["step"] == 4
    for key, value in scores.as_dict().items():
        assert logged[key] == pytest.approx(value, abs=1e-12) or (logged[key] is None and value != value)
    train = [r for r in map(json.loads, lines) if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4] and all(r["loss"] > 0 for r in train)
