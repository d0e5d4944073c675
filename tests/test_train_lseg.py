"""The lseg-semantic task: LSeg with a jointly trained text tower learns ShapeWorld, and the zero-shot
protocol keeps held-out labels out of training but scores them at evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import langseg
from langseg.data import build_dataset
from langseg.errors import BadConfigError
from langseg.evaluate import evaluate
from langseg.train import fit, load_config
from langseg.train.export import export_checkpoint
from langseg.train.lseg_task import build_lseg_semantic

TEXT = "{model_name: null, quick_gelu: true, embed_dim: 32, text_cfg: {context_length: 8, vocab_size: 49408, width: 32, heads: 2, layers: 1}}"  # noqa: E501


pytestmark = pytest.mark.usefixtures("one_thread")


def lseg_config(out_dir: Path, *overrides: str):
    return load_config(
        None,
        [
            "task=lseg-semantic",
            "model=lseg-tiny",
            f"model_kwargs={{freeze_text: false, text: {TEXT}}}",
            "data.kwargs={num_scenes: 16, size: 64, granularity: colour}",
            "data.batch_size=4",
            "data.crop_size=64",
            "val_data={name: shapeworld-semantic, kwargs: "
            "{num_scenes: 8, seed: 1, size: 64, granularity: colour}}",
            "optim={name: adamw, lr: 0.002, head_lr_mult: 1.0}",
            "device=cpu",
            "progress=false",
            f"out_dir={out_dir}",
            *overrides,
        ],
    )


def test_lseg_learns_shapeworld_colours(tmp_path: Path) -> None:
    config = lseg_config(tmp_path / "run", "max_steps=40", "epochs=20", "checkpoint_every=40")
    module = build_lseg_semantic(config).module
    batch = {"image": torch.zeros(1, 3, 64, 64), "mask": torch.zeros(1, 64, 64, dtype=torch.long)}
    assert module(batch)["logits"].shape == (1, 9, 64, 64)  # background + 8 colours
    result = fit(config)
    # The exported model, loaded as a predictor, scores the held-out scenes exactly as training did.
    folder = export_checkpoint(config, "auto", tmp_path / "model")
    # It records its training resolution as the plan: every image is resized to 64 px (long side).
    assert json.loads((folder / "config.json").read_text())["predict"]["plan"] == {"base_size": 64}
    predictor = langseg.load(folder)
    assert predictor.plan.base_size == 64 and predictor.preprocess.max_side == 64
    scores = evaluate(predictor, build_dataset(config.val_data.name, config.val_data.kwargs), progress=False)
    assert scores["mIoU"] == pytest.approx(result.metrics["mIoU"], abs=1e-6)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    losses = [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]
    assert losses[-1] < 0.5 * losses[0]
    assert result.metrics["pixAcc"] > 0.8
    # Fine-tuning starts from the exported folder: one step at a learning rate of ~0 keeps its weights.
    tuned = fit(lseg_config(tmp_path / "tuned", "max_steps=1", f"init_from={folder}", "optim.lr=1e-30"))
    trained = dict(result.module.named_parameters())
    for key, value in tuned.module.named_parameters():
        torch.testing.assert_close(value, trained[key], rtol=0, atol=1e-6, msg=key)


def test_zero_shot_labels_are_left_out_of_training_but_predicted(tmp_path: Path) -> None:
    config = lseg_config(
        tmp_path / "zs",
        "model_kwargs={freeze_text: false, train_exclude_labels: [red, blue], text: " + TEXT + "}",
    )
    module = build_lseg_semantic(config).module
    names = module.labels
    red, blue, green = names.index("red"), names.index("blue"), names.index("green")
    quadrants = torch.tensor([[red, green], [blue, 0]]).repeat_interleave(32, 0).repeat_interleave(32, 1)
    batch = {"image": torch.zeros(2, 3, 64, 64), "mask": quadrants[None].expand(2, 64, 64).clone()}
    out = module(batch)
    assert out["logits"].shape[1] == len(names) - 2  # trained on seen labels only
    target = module.to_train_index[batch["mask"]]
    assert (target[batch["mask"] == red] == 255).all() and (target[batch["mask"] == blue] == 255).all()
    seen = [i for i, name in enumerate(names) if name not in ("red", "blue")]
    assert target[batch["mask"] == green].unique().tolist() == [seen.index(green)]
    module.eval()
    logits_all = module.net(batch["image"], module.text_embeddings())
    assert logits_all.shape[1] == len(names)  # evaluation chooses among seen and unseen labels
    assert torch.equal(module.predict(batch), logits_all.argmax(1))
    with pytest.raises(BadConfigError, match="purple cat"):
        build_lseg_semantic(
            lseg_config(
                tmp_path / "x", "model_kwargs={train_exclude_labels: [purple cat], text: " + TEXT + "}"
            )
        )


def test_frozen_text_is_not_trained_and_cached(tmp_path: Path) -> None:
    config = lseg_config(tmp_path / "frozen", "model_kwargs={freeze_text: true, text: " + TEXT + "}")
    module = build_lseg_semantic(config).module
    assert not any(p.requires_grad for p in module.text_encoder.parameters())
    first = module.text_embeddings()
    assert module.text_embeddings() is first
    groups = module.param_groups(0.1)
    assert {g["name"] for g in groups} == {"backbone", "head"}
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert trainable == {id(p) for g in groups for p in g["params"]}
