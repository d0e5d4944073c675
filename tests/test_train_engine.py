"""The training engine in one process: it learns, accumulates exactly, checkpoints atomically and
resumes bit-identically."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from langseg.data import build_dataset
from langseg.errors import BadConfigError, OutputError
from langseg.evaluate import ReferringEvaluator
from langseg.train import DataConfig, TrainConfig, evaluate, fit, load_config
from langseg.train import checkpoint as ckpt
from langseg.train.checkpoint import find_latest_checkpoint, save_checkpoint, seed_everything
from langseg.train.tasks import build_toy_semantic
from langseg.train.transforms import collate, normalize
from tests.test_cli import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


SMALL_DATA = "data.kwargs={num_scenes: 12, size: 32, granularity: colour}"


def toy_config(out_dir: Path, *overrides: str) -> TrainConfig:
    base = [
        f"out_dir={out_dir}",
        "device=cpu",
        "progress=false",
        SMALL_DATA,
        "data.batch_size=2",
        "model_kwargs={width: 8}",
        "optim.lr=0.02",
    ]
    return load_config(None, [*base, *overrides])


def records(out_dir: Path, kind: str = "train") -> list[dict]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_training_reduces_the_loss_on_the_toy_task(tmp_path: Path) -> None:
    config = toy_config(
        tmp_path,
        "data.kwargs={num_scenes: 64, size: 32, granularity: colour}",
        "data.batch_size=8",
        "data.scale_range=[1, 1]",
        "val_data.kwargs={num_scenes: 8, seed: 1, size: 32, granularity: colour}",
        "model_kwargs={width: 16, dropout: 0.0}",
        "optim.name=adamw",
        "optim.head_lr_mult=1",
        "optim.lr=0.03",
        "max_steps=40",
        "log_every=5",
    )
    # The same seeded initialisation as fit(), scored on held-out scenes before training.
    seed_everything(config.seed)
    untrained = build_toy_semantic(config).module
    val = collate([build_dataset(config.val_data.name, config.val_data.kwargs)[i] for i in range(8)])
    val["image"] = normalize(val["image"], config.data.mean, config.data.std)
    with torch.no_grad():
        before = untrained(val)["loss"].item()

    result = fit(config)
    result.module.eval()
    with torch.no_grad():
        after = result.module(val)["loss"].item()
    assert before == pytest.approx(np.log(9), rel=0.25)  # about chance over 9 colour classes
    assert after < 0.15 * before
    train = records(tmp_path)
    assert [r["step"] for r in train] == list(range(5, 41, 5))
    assert train[-1]["loss"] < 0.3 * train[0]["loss"]
    assert all(r["lr"] > 0 and r["throughput"] > 0 for r in train)
    assert train[0]["lr"] > train[-1]["lr"]  # poly decay
    evaluations = records(tmp_path, "eval")  # at each epoch end (8 steps of 8 scenes) and at the end
    assert [r["step"] for r in evaluations] == [8, 16, 24, 32, 40]
    evaluation = evaluations[-1]
    # All-background predictions score 0.12 here; learning the colours lifts mIoU well above it.
    assert evaluation["mIoU"] > evaluations[0]["mIoU"] + 0.15 and evaluation["mIoU"] > 0.3
    assert result.metrics is not None and result.metrics["mIoU"] == pytest.approx(evaluation["mIoU"])


def test_gradient_accumulation_equals_one_large_batch(tmp_path: Path) -> None:
    common = ("data.scale_range=[1, 1]", "data.hflip=false", "model_kwargs={width: 8, dropout: 0.0}")
    accumulated = fit(
        toy_config(tmp_path / "a", *common, "data.batch_size=2", "grad_accum_steps=2", "max_steps=3")
    )
    large = fit(toy_config(tmp_path / "b", *common, "data.batch_size=4", "max_steps=3"))
    initial = build_toy_semantic(toy_config(tmp_path / "c", *common)).module.state_dict()
    for name, value in large.module.state_dict().items():
        torch.testing.assert_close(accumulated.module.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(large.module.state_dict()["head.weight"], initial["head.weight"])


def test_channels_last_keeps_its_layout_and_the_same_losses(tmp_path: Path) -> None:
    common = ("data.scale_range=[1, 1]", "max_steps=6", "log_every=1", "eval_every=3")
    val = "val_data.kwargs={num_scenes: 4, seed: 1, size: 32, granularity: colour}"
    runs = {}
    for layout in ("false", "true"):
        result = fit(toy_config(tmp_path / layout, *common, val, f"channels_last={layout}"))
        convs = [p for p in result.module.parameters() if p.dim() == 4 and p.shape[-1] > 1]
        fmt = torch.channels_last if layout == "true" else torch.contiguous_format
        # The layout survives six AdamW updates (in-place), and 3x3 weights really were converted.
        assert convs and all(p.is_contiguous(memory_format=fmt) for p in convs)
        assert layout == "false" or not any(p.is_contiguous() for p in convs)
        runs[layout] = [r["loss"] for r in records(tmp_path / layout)] + [
            r["mIoU"] for r in records(tmp_path / layout, "eval")
        ]
    # Same arithmetic in another memory order: equal up to float rounding.
    np.testing.assert_allclose(runs["true"], runs["false"], rtol=1e-4)


def test_resume_mid_epoch_is_bit_identical(tmp_path: Path) -> None:
    # 12 scenes / batch 2 = 6 steps per epoch; 10 steps cross an epoch boundary. Augmentation and
    # dropout are on, so data order, augmentation and RNG state all have to be restored.
    settings = (
        "max_steps=10",
        "checkpoint_every=4",
        "log_every=1",
        "data.crop_size=24",
        "model_kwargs={width: 8, dropout: 0.3}",
    )
    full = fit(toy_config(tmp_path / "full", *settings))

    run = tmp_path / "killed"
    cut = fit(toy_config(run, *settings), should_stop=lambda step: step == 6)
    assert cut.stopped_early and cut.state.step == 6
    # Steps 5 and 6 ran after the last checkpoint (step 4): like a kill, their work is lost.
    assert find_latest_checkpoint(run / "checkpoints").name == "step_00000004.pt"
    saved = torch.load(run / "checkpoints" / "step_00000004.pt", weights_only=True)
    assert saved["state"] == {"step": 4, "epoch": 0, "batch_in_epoch": 4, "last_eval_step": -1}
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "layout", "config"} <= saved.keys()
    assert set(saved["rng"][0]) == {"python", "numpy", "torch", "cuda"}

    torch.manual_seed(1234)  # a fresh process would not share the killed run's RNG state
    random.seed(1234)
    np.random.seed(1234)
    resumed = fit(toy_config(run, *settings), resume="auto")
    assert resumed.state.step == 10 and not resumed.stopped_early
    assert_same_weights(resumed.module.state_dict(), full.module.state_dict())
    # The log was cut back to the checkpoint and then continued: it matches the uninterrupted run.
    full_log, resumed_log = records(tmp_path / "full"), records(run)
    assert [r["step"] for r in resumed_log] == list(range(1, 11))
    assert [r["loss"] for r in resumed_log] == [r["loss"] for r in full_log]


def test_checkpoints_are_atomic_and_temp_files_are_never_resumed(tmp_path: Path, monkeypatch) -> None:
    config = toy_config(tmp_path, "max_steps=4", "checkpoint_every=1", "keep_checkpoints=2")
    fit(config)
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000003.pt", "step_00000004.pt"]

    # A crash in the middle of writing leaves neither a checkpoint nor a temporary file.
    real_save = torch.save

    def crash(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OutputError, match="No space left"):
        save_checkpoint({"model": {}}, folder / "step_00000009.pt")
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000003.pt", "step_00000004.pt"]

    # A temporary file left by a killed writer (the name save_checkpoint uses) is not a checkpoint.
    (folder / ".step_00000008.pt.x1y2z3.tmp").write_bytes(b"PK\x03\x04 truncated")
    assert find_latest_checkpoint(folder) == folder / "step_00000004.pt"
    assert [step for step, _ in ckpt.list_checkpoints(folder)] == [3, 4]
    longer = toy_config(tmp_path, "max_steps=5", "checkpoint_every=1", "keep_checkpoints=2")
    resumed = fit(longer, resume="auto")
    assert resumed.state.step == 5 and resumed.checkpoint == folder / "step_00000005.pt"

    # A fresh run refuses a folder that holds one, rather than mixing two runs' logs and checkpoints.
    with pytest.raises(OutputError, match="already holds a training run"):
        fit(config)
    wider = toy_config(tmp_path, "max_steps=6", "model_kwargs={width: 16}")
    with pytest.raises(BadConfigError, match="does not fit the model"):
        fit(wider, resume="auto")


def test_data_workers_and_auto_resume_without_a_checkpoint(tmp_path: Path) -> None:
    settings = ("max_steps=3", "data.crop_size=24", "model_kwargs={width: 4, dropout: 0.2}")
    in_process = fit(toy_config(tmp_path / "a", *settings))
    # Worker processes get the same per-sample augmentation and leave the main RNG alone.
    workers = fit(toy_config(tmp_path / "b", *settings, "data.num_workers=2"))
    assert_same_weights(workers.module.state_dict(), in_process.module.state_dict())
    # "auto" in a folder whose run died before its first checkpoint starts over, log included.
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 9.0}\n')
    fresh = fit(toy_config(tmp_path / "c", *settings), resume="auto")
    assert_same_weights(fresh.module.state_dict(), in_process.module.state_dict())
    assert [r["loss"] for r in records(tmp_path / "c")] == [r["loss"] for r in records(tmp_path / "a")]


def test_evaluate_referring_through_the_predict_contract() -> None:
    class Oracle(torch.nn.Module):
        """predict() returns the target (or nothing): known scores."""

        def __init__(self, perfect: bool) -> None:
            super().__init__()
            self.perfect, self.weight = perfect, torch.nn.Parameter(torch.zeros(1))

        def predict(self, batch: dict) -> torch.Tensor:
            assert batch["image"].dtype == torch.float32 and len(batch["text"]) == batch["mask"].shape[0]
            return batch["mask"] if self.perfect else torch.zeros_like(batch["mask"])

    dataset = build_dataset("shapeworld-referring", {"num_scenes": 2, "size": 32})
    data = DataConfig(batch_size=4)
    perfect = evaluate(Oracle(True), dataset, ReferringEvaluator(), data)
    assert perfect.count == len(dataset) and perfect.overall_iou == 1.0 and perfect.precision[0.9] == 1.0
    empty = evaluate(Oracle(False), dataset, ReferringEvaluator(), data)
    assert empty.overall_iou == 0.0 and empty.mean_iou == 0.0


def test_cli_train_and_resume(tmp_path: Path, monkeypatch, capsys) -> None:
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(
        "task: toy-semantic\nmodel_kwargs: {width: 4}\ndevice: cpu\nprogress: false\n"
        "data: {kwargs: {num_scenes: 8, size: 32, granularity: colour}, batch_size: 4}\n"
    )

    def run(*args: str) -> tuple[int, str]:
        code, out, err = run_cli(monkeypatch, capsys, "train", str(recipe), *args)
        return code, out + err

    out_dir = tmp_path / "run"
    code, out = run(f"out_dir={out_dir}", "max_steps=2")
    assert code == 0 and "trained to step 2/2" in out
    assert (out_dir / "checkpoints" / "step_00000002.pt").is_file() and (out_dir / "config.yaml").is_file()
    code, out = run(f"out_dir={out_dir}", "max_steps=3", "--resume", "auto")
    assert code == 0 and "trained to step 3/3" in out
    for args, expected in [
        ((f"out_dir={out_dir}",), "already holds a training run"),
        (("optim.lrr=1",), "unknown config key 'optim.lrr'"),
        (("data.batch_size=many",), "'data.batch_size' must be an integer"),
        (("task=nope",), "unknown task 'nope'"),
        ((f"out_dir={tmp_path / 'x'}", "--resume", str(tmp_path / "missing.pt")), "not found"),
    ]:
        code, out = run(*args)
        assert code == 2 and expected in out and "Traceback" not in out
