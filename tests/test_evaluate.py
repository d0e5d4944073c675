"""Predictor evaluation: metrics equal a literal loop, and 2 torchrun ranks equal one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from langseg.data import COLOURS, ShapeWorldConfig, ShapeWorldSemantic
from langseg.evaluate import evaluate
from langseg.metrics import SemanticMetrics
from langseg.predict import Preprocess, Segmenter

ROOT = Path(__file__).resolve().parents[1]


def colour_segmenter() -> Segmenter:
    """A 'model' that labels each pixel with the nearest named colour (grey -> background)."""
    names = {"background": (128, 128, 128), **COLOURS}

    def encode_text(prompts: list[str]) -> torch.Tensor:
        return torch.tensor([names[p] for p in prompts], dtype=torch.float32) / 255.0

    def encode_image(images: torch.Tensor) -> torch.Tensor:
        return images

    def dense_logits(pixels: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        # Negative squared distance in RGB: the nearest colour wins.
        return -((pixels[:, None] - text[None, :, :, None, None]) ** 2).sum(2) * 50

    return Segmenter(
        encode_image, dense_logits, encode_text, preprocess=Preprocess(mean=(0, 0, 0), std=(1, 1, 1))
    )


def test_semantic_evaluation_equals_a_literal_loop() -> None:
    dataset = ShapeWorldSemantic(6, seed=3, config=ShapeWorldConfig(size=64), granularity="colour")
    segmenter = colour_segmenter()
    scores = evaluate(segmenter, dataset, progress=False)
    literal = SemanticMetrics(len(dataset.labels))
    for i in range(len(dataset)):
        sample = dataset[i]
        image = sample["image"].permute(1, 2, 0).numpy()
        literal.update(torch.from_numpy(segmenter.segment(image, dataset.labels).mask), sample["mask"])
    expected = literal.compute()
    assert scores["mIoU"] == pytest.approx(expected.miou) and scores["pixAcc"] == pytest.approx(
        expected.pixel_accuracy
    )
    assert scores["pixAcc"] > 0.99  # plain ShapeWorld colours are separable by nearest colour
    assert evaluate(segmenter, dataset, limit=2, progress=False) != scores


RANK_SCRIPT = """
import json, sys, torch
sys.path.insert(0, {root!r})
from tests.test_evaluate import colour_segmenter
from langseg.data import ShapeWorldConfig, ShapeWorldSemantic
from langseg.evaluate import evaluate
torch.set_num_threads(1)
world = ShapeWorldConfig(size=48, background="noise")
dataset = ShapeWorldSemantic(5, seed=4, config=world, granularity="colour")
scores = evaluate(colour_segmenter(), dataset, progress=False)
import os
if os.environ.get("RANK", "0") == "0":
    json.dump(scores, open(sys.argv[1], "w"))
"""


def test_two_ranks_give_the_single_process_scores(tmp_path: Path) -> None:
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT.format(root=str(ROOT)))
    single, double = tmp_path / "one.json", tmp_path / "two.json"
    subprocess.run([sys.executable, str(script), str(single)], check=True, timeout=300, cwd=ROOT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run = subprocess.run(
        [*launch, str(script), str(double)], timeout=300, cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    one, two = json.loads(single.read_text()), json.loads(double.read_text())
    assert one.keys() == two.keys()
    for key in one:
        assert np.isclose(one[key], two[key], equal_nan=True), key


def test_fewshot_scores_follow_the_zero_shot_protocol() -> None:
    """Hand-worked: class 3 has two samples, class 7 one; mIoU averages per-class foreground IoUs."""
    from langseg.evaluate import FewShotMetrics

    def masks(pred: list[int], target: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor([pred]), torch.tensor([target])

    metrics = FewShotMetrics()
    metrics.update(3, *masks([1, 1, 0, 0], [1, 0, 0, 0]))  # class 3: I=1, U=2
    metrics.update(3, *masks([1, 1, 1, 0], [1, 1, 255, 0]))  # class 3: I=2, U=2 (255 ignored)
    metrics.update(7, *masks([0, 0, 0, 0], [0, 0, 1, 1]))  # class 7: I=0, U=2
    scores = metrics.compute()
    # Foreground IoU: class 3 = (1 + 2) / (2 + 2) = 0.75, class 7 = 0 / 2 = 0 -> mIoU 0.375.
    assert scores.miou == pytest.approx(0.375) and scores.classes == 2
    # All samples pooled: fg I=3, U=6 -> 0.5; bg: pred-bg & target-bg = 1 + 1 + 2 = 4 ... see below.
    # Pooled confusion over labelled pixels (rows target, cols pred):
    #   bg->bg: sample1 {2,3}=2, sample2 {3}=1, sample3 {0,1}=2 -> 5;  bg->fg: sample1 {1}=1 -> 1
    #   fg->bg: sample3 {2,3}=2 -> 2;  fg->fg: 1 + 2 = 3.  bg IoU = 5 / (5 + 1 + 2) = 0.625, fg = 3 / 6 = 0.5.
    assert scores.fb_iou == pytest.approx((0.625 + 0.5) / 2)
