"""`langseg eval` end to end on real-layout fixtures: one semantic (VOC2012), one few-shot (PASCAL-5i) and
one referring (RefCOCO) dataset, with random-weight models saved the way langseg saves them. Scores are
checked against the same predictions scored literally."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import langseg
from langseg.data import build_dataset
from langseg.metrics import FewShotMetrics, ReferringMetrics, SemanticMetrics
from langseg.models.vlt import vlt_tiny
from langseg.predict.tokenizers import Vocab
from langseg.train import load_config
from langseg.train.lseg_task import build_lseg_semantic
from langseg.zoo.vlt import save_vlt
from tests.test_cli import run_cli
from tests.test_data_fewshot import write_hsnet_pascal_lists, write_pascal
from tests.test_data_refcoco import write_refer
from tests.test_data_semantic import write_voc

TEXT = "{model_name: null, quick_gelu: true, embed_dim: 32, text_cfg: {context_length: 8, vocab_size: 49408, width: 32, heads: 2, layers: 1}}"  # noqa: E501


pytestmark = pytest.mark.usefixtures("one_thread")


def test_eval_voc2012_with_an_lseg_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    write_voc(tmp_path / "voc", num=4)
    torch.manual_seed(0)
    config = load_config(None, ["task=lseg-semantic", "model=lseg-tiny", f"model_kwargs={{text: {TEXT}}}"])
    folder = build_lseg_semantic(config).module.export(tmp_path / "lseg")
    out = tmp_path / "scores.json"
    args = ["eval", str(folder), "--data", "voc2012", "--root", str(tmp_path / "voc"), "--split", "val"]
    code, stdout, stderr = run_cli(monkeypatch, capsys, *args, "--out", str(out))
    assert code == 0, stderr
    assert "mIoU" in stdout
    scores = json.loads(out.read_text())

    dataset = build_dataset("voc2012", {"root": str(tmp_path / "voc"), "split": "val"})
    segmenter = langseg.load(folder)
    literal = SemanticMetrics(len(dataset.labels))
    for i in range(len(dataset)):
        sample = dataset[i]
        mask = segmenter.segment(sample["image"].permute(1, 2, 0).numpy(), dataset.labels).mask
        literal.update(torch.from_numpy(mask), sample["mask"])
    assert scores["mIoU"] == pytest.approx(literal.compute().miou)
    assert scores["pixAcc"] == pytest.approx(literal.compute().pixel_accuracy)


def test_eval_refcoco_with_a_vlt_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    write_refer(tmp_path / "refer", split_by="unc")
    torch.manual_seed(0)
    vocab = Vocab.build(["man in red", "left guy", "dog on the left", "person in the middle"])
    model = vlt_tiny(text={"kind": "gru", "vocab_size": len(vocab), "word_dim": 32, "hidden_dim": 32})
    folder = save_vlt(model, vocab, tmp_path / "vlt", "vlt-tiny")
    out = tmp_path / "scores.json"
    args = ["eval", str(folder), "--data", "refcoco", "--root", str(tmp_path / "refer"), "--split", "testA"]
    code, _, stderr = run_cli(monkeypatch, capsys, *args, "--out", str(out))
    assert code == 0, stderr
    scores = json.loads(out.read_text())

    dataset = build_dataset("refcoco", {"root": str(tmp_path / "refer"), "split": "testA"})
    referrer = langseg.load(folder)
    literal = ReferringMetrics()
    for i in range(len(dataset)):
        sample = dataset[i]
        mask = referrer.refer(sample["image"].permute(1, 2, 0).numpy(), sample["text"]).mask
        literal.update(torch.from_numpy(mask), sample["mask"])
    expected = literal.compute()
    assert expected.count == len(dataset) == 3  # two refs with 2 + 1 sentences in testA
    assert scores["mIoU"] == pytest.approx(expected.mean_iou)
    assert scores["Pr@0.5"] == pytest.approx(expected.precision[0.5])


def test_eval_pascal5i_with_an_lseg_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    """The few-shot protocol with a real (random) LSeg: each sample's own ["others", class] labels."""
    root = tmp_path / "voc"
    write_pascal(root)
    write_hsnet_pascal_lists(root / "splits")
    torch.manual_seed(0)
    config = load_config(None, ["task=lseg-semantic", "model=lseg-tiny", f"model_kwargs={{text: {TEXT}}}"])
    folder = build_lseg_semantic(config).module.export(tmp_path / "lseg")
    out = tmp_path / "scores.json"
    # 64 x 64 and every pair once keep the tiny LSeg quick (the default is 480 x 480, 1000 episodes).
    settings = {"fold": 0, "size": 64, "episodes": None}
    args = ["eval", str(folder), "--data", "pascal-5i", "--root", str(root), "--fold", "0"]
    args += ["--data-arg", "size=64", "--data-arg", "episodes=null"]
    code, stdout, stderr = run_cli(monkeypatch, capsys, *args, "--out", str(out))
    assert code == 0, stderr
    assert "FB-IoU" in stdout
    scores = json.loads(out.read_text())

    dataset = build_dataset("pascal-5i", {"root": str(root), **settings})
    segmenter = langseg.load(folder)
    literal = FewShotMetrics()
    for i in range(len(dataset)):
        sample = dataset[i]
        mask = segmenter.segment(sample["image"].permute(1, 2, 0).numpy(), sample["labels"]).mask
        literal.update(sample["meta"]["class_id"], torch.from_numpy(mask), sample["mask"])
    expected = literal.compute()
    assert expected.classes == scores["classes"] == 2  # aeroplane and bird, from HSNet's fold-0 list
    assert scores["mIoU"] == pytest.approx(expected.miou)
    assert scores["FB-IoU"] == pytest.approx(expected.fb_iou)
