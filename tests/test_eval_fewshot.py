"""The few-shot scoring end to end (``langseg eval --data pascal-5i / fss1000``) on the tiny real-layout
fixtures of test_data_fewshot.py, with hand-made predictors whose scores are worked out by hand.

The hand counts are for the fixtures' own 24 x 32 pixels and every pair once, so these tests pass
``RAW`` (no 480 x 480 resizing, no 1000 episodes); test_fewshot_protocol.py checks the published
protocol the registered names default to.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import Dataset

import langseg
from langseg.data import build_dataset
from langseg.evaluate import evaluate
from tests.test_cli import run_cli
from tests.test_data_fewshot import write_fss, write_hsnet_pascal_lists, write_pascal

pytestmark = pytest.mark.usefixtures("one_thread")

# The registered datasets' protocol settings switched off (see the module docstring).
RAW = {"size": None, "episodes": None}
RAW_ARGS = ["--data-arg", "size=null", "--data-arg", "episodes=null"]


@dataclass
class Result:
    mask: np.ndarray


class MaskPredictor:
    """A 'segmenter' answering ``segment(image, ["others", name])`` with a fixed rule.

    ``truth``: the ground truth (looked up by image and class; ignored pixels predicted as others);
    ``others``: class 0 everywhere; ``class``: class 1 everywhere.
    """

    def __init__(self, rule: str, dataset: Dataset | None = None) -> None:
        self.rule, self.truth = rule, {}
        for i in range(len(dataset) if dataset is not None else 0):  # type: ignore[arg-type]
            sample = dataset[i]  # type: ignore[index]
            mask = sample["mask"].numpy()
            self.truth[self.key(sample["image"].permute(1, 2, 0).numpy(), sample["labels"])] = mask % 255

    @staticmethod
    def key(image: np.ndarray, labels: list[str]) -> tuple[bytes, str]:
        return image.tobytes(), labels[1]

    def segment(self, image: np.ndarray, labels: list[str]) -> Result:
        assert image.dtype == np.uint8 and image.shape[2] == 3 and labels[0] == "others"
        if self.rule == "truth":
            return Result(self.truth[self.key(image, labels)])
        return Result(np.full(image.shape[:2], int(self.rule == "class"), dtype=np.int64))


def pascal_root(tmp_path: Path) -> Path:
    """Fold 0 from HSNet's lists: 2007_000001 with aeroplane (1), 2007_000002 with bird (3)."""
    root = tmp_path / "voc"
    write_pascal(root)
    write_hsnet_pascal_lists(root / "splits")
    return root


def fss_root(tmp_path: Path) -> Path:
    """Two test classes of 4 images each (1, 2, 3, 10)."""
    root = tmp_path / "fss"
    write_fss(root, ["ab_wheel", "bus"])
    (root / "splits" / "fss").mkdir(parents=True)
    (root / "splits" / "fss" / "test.txt").write_text("ab_wheel\nbus\n")
    return root


# PASCAL-5i fold 0 by hand (24 x 32 = 768 pixels per image):
#   aeroplane sample: row 0 ignored (255), left half aeroplane -> 736 labelled, fg 23 * 16 = 368, bg 368;
#   bird sample: 5 bird pixels, nothing ignored -> 768 labelled, fg 5, bg 763.
#   pooled: 1504 labelled, fg 373, bg 1131.
PASCAL = {
    "truth": {"mIoU": 1.0, "FB-IoU": 1.0, "classes": 2.0},
    # fg IoU 0 for both classes; bg IoU = 1131 / 1504 (every labelled pixel predicted bg), fg 0.
    "others": {"mIoU": 0.0, "FB-IoU": (1131 / 1504 + 0) / 2, "classes": 2.0},
    # fg IoU = fg / labelled per class: 368 / 736 and 5 / 768; pooled fg 373 / 1504, bg 0.
    "class": {"mIoU": (368 / 736 + 5 / 768) / 2, "FB-IoU": (0 + 373 / 1504) / 2, "classes": 2.0},
}
# FSS-1000: masks >= 128 in columns 16..31 -> 384 fg and 384 bg pixels in each of the 8 images.
FSS = {
    "truth": {"mIoU": 1.0, "FB-IoU": 1.0, "classes": 2.0},
    "others": {"mIoU": 0.0, "FB-IoU": (0.5 + 0) / 2, "classes": 2.0},
    "class": {"mIoU": 0.5, "FB-IoU": (0 + 0.5) / 2, "classes": 2.0},
}


@pytest.mark.parametrize("rule", sorted(PASCAL))
def test_pascal5i_fold0_scores_through_the_python_api(tmp_path: Path, rule: str) -> None:
    dataset = build_dataset("pascal-5i", {"root": str(pascal_root(tmp_path)), "fold": 0, **RAW})
    assert [item[1] for item in dataset.items] == [1, 3]  # type: ignore[attr-defined]
    scores = evaluate(MaskPredictor(rule, dataset), dataset, progress=False)
    assert scores == pytest.approx(PASCAL[rule], abs=1e-12)


@pytest.mark.parametrize("rule", sorted(FSS))
def test_fss1000_scores_through_the_python_api(tmp_path: Path, rule: str) -> None:
    dataset = build_dataset("fss1000", {"root": str(fss_root(tmp_path)), "split": "test", "size": None})
    assert len(dataset) == 8  # type: ignore[arg-type]
    scores = evaluate(MaskPredictor(rule, dataset), dataset, progress=False)
    assert scores == pytest.approx(FSS[rule], abs=1e-12)


def test_limit_scores_the_first_samples_only(tmp_path: Path) -> None:
    dataset = build_dataset("pascal-5i", {"root": str(pascal_root(tmp_path)), "fold": 0, **RAW})
    scores = evaluate(MaskPredictor("class"), dataset, limit=1, progress=False)
    # The aeroplane sample alone: fg IoU 368 / 736, bg IoU 0.
    assert scores == pytest.approx({"mIoU": 0.5, "FB-IoU": 0.25, "classes": 1.0})


@pytest.mark.parametrize(
    ("data", "root", "args", "expected"),
    [
        ("pascal-5i", pascal_root, ["--data-arg", "fold=0", *RAW_ARGS], PASCAL),
        ("fss1000", fss_root, ["--split", "test", "--data-arg", "size=null"], FSS),
    ],
)
def test_langseg_eval_scores_fewshot_benchmarks(
    tmp_path: Path, monkeypatch, capsys, data: str, root, args: list[str], expected: dict
) -> None:
    folder = root(tmp_path)
    dataset = build_dataset(
        data,
        {"root": str(folder), "fold": 0, **RAW}
        if data == "pascal-5i"
        else {"root": str(folder), "size": None},
    )
    for rule in ("truth", "others"):
        loaded: list[str] = []

        def load(
            model: str, rule: str = rule, loaded: list[str] = loaded, **options: object
        ) -> MaskPredictor:
            loaded.append(model)
            return MaskPredictor(rule, dataset)

        # The CLI loads through the public API; this stands in for a checkpoint folder (which the CLI's
        # check before work would otherwise look for).
        monkeypatch.setattr(langseg, "load", load)
        monkeypatch.setattr("langseg.api.check_load", lambda *args, **kwargs: None)
        out = tmp_path / f"{data}-{rule}.json"
        cli = ["eval", "my-model", "--data", data, "--root", str(folder), *args, "--out", str(out)]
        code, stdout, stderr = run_cli(monkeypatch, capsys, *cli)
        assert code == 0, stderr
        assert loaded == ["my-model"] and "FB-IoU" in stdout and "classes" in stdout
        assert json.loads(out.read_text()) == pytest.approx(expected[rule], abs=1e-12)
