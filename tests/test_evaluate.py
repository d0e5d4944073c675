"""Evaluation: evaluators keep one contract, the right one is picked per dataset, predictor metrics equal
a literal loop, and 2 torchrun ranks equal one process. Few-shot end to end: test_eval_fewshot.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from langseg.data import COLOURS, ShapeWorldConfig, ShapeWorldReferring, ShapeWorldSemantic, write_shapeworld
from langseg.data.shapes_datasets import ShapeWorldFolder
from langseg.errors import BadConfigError, BadDataError
from langseg.evaluate import (
    FewShotEvaluator,
    ReferringEvaluator,
    SemanticEvaluator,
    evaluate,
    evaluator_for,
    run_evaluator,
)
from langseg.metrics import SemanticMetrics
from langseg.predict import Preprocess, Segmenter

ROOT = Path(__file__).resolve().parents[1]


class ColourModel(nn.Module):
    """A dense image-text 'model': pixels are their colour, each word a named colour (grey = background)."""

    def __init__(self) -> None:
        super().__init__()
        self.names = {"background": (128, 128, 128), **COLOURS}
        self.register_buffer("table", torch.tensor(list(self.names.values()), dtype=torch.float32) / 255.0)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return torch.tensor([list(self.names).index(p) for p in prompts])

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        # One-hot: it survives the predictor's unit-normalisation, which RGB vectors would not.
        return F.one_hot(token_ids, len(self.names)).float()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def dense_logits(self, pixels: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        # Negative squared distance in RGB: the nearest colour wins.
        colours = text @ self.table
        return -((pixels[:, None] - colours[None, :, :, None, None]) ** 2).sum(2) * 50


def colour_segmenter() -> Segmenter:
    """A segmenter that labels each pixel with the nearest named colour."""
    model = ColourModel()
    return Segmenter(model, model.tokenize, preprocess=Preprocess(mean=(0, 0, 0), std=(1, 1, 1)))


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


def fewshot_sample(class_id: int, target: list[int]) -> dict:
    """A one-row few-shot sample (the structure of langseg.data.fewshot_datasets)."""
    mask = torch.tensor([target])
    image = torch.zeros(3, *mask.shape, dtype=torch.uint8)
    meta = {"class_id": class_id, "class_name": f"class {class_id}"}
    return {"image": image, "mask": mask, "labels": ["others", f"class {class_id}"], "meta": meta}


def test_evaluator_for_picks_the_protocol_from_the_dataset(tmp_path: Path) -> None:
    semantic = ShapeWorldSemantic(2, seed=0, config=ShapeWorldConfig(size=32), granularity="colour")
    picked = evaluator_for(semantic)
    assert isinstance(picked, SemanticEvaluator)
    assert picked.class_names == semantic.labels and picked.num_classes == len(semantic.labels) == 9
    assert isinstance(
        evaluator_for(ShapeWorldReferring(1, config=ShapeWorldConfig(size=32))), ReferringEvaluator
    )
    # A folder read as referring still carries the world's class labels: its text decides.
    write_shapeworld(tmp_path / "w", 1, config=ShapeWorldConfig(size=32))
    assert isinstance(evaluator_for(ShapeWorldFolder(tmp_path / "w", "referring")), ReferringEvaluator)
    assert isinstance(evaluator_for([fewshot_sample(3, [1, 0])]), FewShotEvaluator)
    with pytest.raises(BadDataError, match="cannot tell how to score a list") as err:
        evaluator_for([{"image": torch.zeros(3, 1, 1), "mask": torch.zeros(1, 1)}])
    assert "meta['class_id']" in err.value.hint
    with pytest.raises(BadDataError):
        evaluator_for([])


def test_fewshot_evaluator_scores_batches_per_class_id() -> None:
    """Batches of two and one sample; the hand-worked numbers of test_metrics' few-shot example."""
    samples = [
        fewshot_sample(3, [1, 0, 0, 0]),
        fewshot_sample(3, [1, 1, 255, 0]),
        fewshot_sample(7, [0, 0, 1, 1]),
    ]
    preds = [[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]]

    def batch(items: list[int]) -> dict:
        return {
            "image": torch.stack([samples[i]["image"] for i in items]),
            "mask": torch.stack([samples[i]["mask"] for i in items]),
            "labels": [samples[i]["labels"] for i in items],
            "meta": [{**samples[i]["meta"], "index": i} for i in items],
        }

    def predict(b: dict) -> torch.Tensor:
        return torch.tensor([[preds[m["index"]]] for m in b["meta"]])  # B x 1 x 4

    scores = run_evaluator(FewShotEvaluator(), predict, [batch([0, 1]), batch([2])])
    # Class 3: (1 + 2) / (2 + 2) = 0.75, class 7: 0 -> mIoU 0.375; pooled bg 5/8, fg 3/6 -> FB-IoU 0.5625.
    assert scores.as_dict() == pytest.approx({"mIoU": 0.375, "FB-IoU": 0.5625, "classes": 2.0})


class OnlyRefers:
    def refer(self, image: np.ndarray, text: str) -> None:
        raise AssertionError("never called")


class OnlySegments:
    def segment(self, image: np.ndarray, labels: list[str]) -> None:
        raise AssertionError("never called")


def test_a_predictor_must_fit_the_dataset() -> None:
    semantic = ShapeWorldSemantic(1, seed=0, config=ShapeWorldConfig(size=32), granularity="colour")
    with pytest.raises(BadConfigError, match="OnlyRefers has no segment"):
        evaluate(OnlyRefers(), semantic, progress=False)
    referring = ShapeWorldReferring(1, config=ShapeWorldConfig(size=32))
    with pytest.raises(BadConfigError, match="OnlySegments has no refer") as err:
        evaluate(OnlySegments(), referring, progress=False)
    assert "referring models" in err.value.hint


def test_evaluation_does_not_import_the_training_code() -> None:
    code = (
        "import sys, langseg.evaluate; "
        "loaded = sorted(m for m in sys.modules if m.startswith('langseg.train')); "
        "assert not loaded, loaded"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
