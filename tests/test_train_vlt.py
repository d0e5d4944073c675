"""The vlt-referring task: a tiny VLT learns on ShapeWorld-Ref, predicts masks at the image size, takes
the ablation switches, round-trips through langseg.load, and names the key of a bad config."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import langseg
from langseg.data import build_dataset
from langseg.errors import BadConfigError, BadDataError
from langseg.models.vlt import THRESHOLD
from langseg.predict.referrer import Referrer
from langseg.train import fit, load_config
from langseg.train.config import CLIP_MEAN, CLIP_STD
from langseg.train.engine import FitResult
from langseg.train.transforms import collate, normalize
from langseg.train.vlt_task import VLTTrainModule, build_vlt_referring, export_vlt, save_trained_vlt

# A VLT small enough to train a few dozen steps in seconds on one thread, at ShapeWorld's smallest size.
TINY = (
    "{input_size: 32, backbone_kwargs: {channels: [8, 16, 16]}, fusion_dim: 16, hidden_dim: 16, "
    "num_heads: 2, ffn_dim: 32, num_queries: 4, text: {word_dim: 16, hidden_dim: 16}"
)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def vlt_config(out_dir: Path, *overrides: str, model_kwargs: str = ""):
    return load_config(
        None,
        [
            "task=vlt-referring",
            "model=vlt-tiny",
            f"model_kwargs={TINY}{', ' + model_kwargs if model_kwargs else ''}}}",
            "data={name: shapeworld-referring, kwargs: {num_scenes: 12, size: 32}, batch_size: 8, "
            "scale_range: [1, 1]}",
            "val_data={name: shapeworld-referring, kwargs: {num_scenes: 4, seed: 1, size: 32}, "
            "batch_size: 16}",
            "optim={name: adamw, lr: 0.003, head_lr_mult: 1.0, warmup_steps: 3}",
            "device=cpu",
            "progress=false",
            "log_every=5",
            f"out_dir={out_dir}",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[FitResult, Path]:
    out = tmp_path_factory.mktemp("vlt") / "run"
    return fit(vlt_config(out, "max_steps=40")), out


def first_batch(module: VLTTrainModule, dataset, count: int = 4) -> dict:
    batch = collate([dataset[i] for i in range(count)])
    return {**batch, "image": normalize(batch["image"], CLIP_MEAN, CLIP_STD)}


def test_task_trains_and_loss_falls(trained: tuple[FitResult, Path]) -> None:
    result, out = trained
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 8 and losses[-1] < 0.5 * losses[0]
    assert set(result.metrics) == {"oIoU", "mIoU", "Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9"}
    assert all(0.0 <= v <= 1.0 for v in result.metrics.values())
    # The vocabulary travels in the training checkpoint (the module's extra state).
    state = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
    assert state["model"]["_extra_state"]["tokenizer"] == result.module.tokenizer.to_config()


def test_predict_gives_bool_masks_at_the_image_size(tmp_path: Path) -> None:
    parts = build_vlt_referring(vlt_config(tmp_path / "p"))
    module = parts.module.eval()
    batch = first_batch(module, parts.train_dataset)
    pred = module.predict(batch)
    assert pred.shape == (4, 32, 32) and pred.dtype == torch.bool
    assert torch.equal(pred, module.probability(batch) > THRESHOLD)
    # Another image size is letterboxed to the model's input and mapped back.
    wide = {**batch, "image": torch.randn(2, 3, 24, 40), "mask": torch.zeros(2, 24, 40, dtype=torch.bool)}
    wide["text"] = batch["text"][:2]
    assert module.predict(wide).shape == (2, 24, 40)
    module.train()
    loss = module(wide)["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_ablation_switches_and_vocabulary_reach_the_model(tmp_path: Path) -> None:
    def net(model_kwargs: str):
        return build_vlt_referring(vlt_config(tmp_path / "a", model_kwargs=model_kwargs)).module.net

    base = build_vlt_referring(vlt_config(tmp_path / "a")).module
    assert base.net.qgm is not None and base.net.qbm is not None and base.net.num_queries == 4
    vocab = base.tokenizer
    assert vocab.is_known("left") and vocab.is_known("right")  # flips need both
    assert base.net.text.embed.num_embeddings == len(vocab)
    assert base.net.input_size == 32 and base.net.config["hidden_dim"] == 16
    text = net("query_source: text, num_queries: 2, qbm: false")
    assert text.qgm is None and text.text_query is not None and text.qbm is None and text.num_queries == 2
    learnt = net("query_source: learnt, num_queries: 8")
    assert learnt.learnt_query.num_embeddings == 8 and learnt.response_maps is not None
    conv = net("decoder: conv")
    assert conv.conv_decoder is not None and conv.transformer is None
    groups = base.param_groups(0.1)
    assert [g["name"] for g in groups] == ["backbone", "head"]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in base.net.backbone.parameters()}
    assert sum(len(g["params"]) for g in groups) == len(list(base.parameters()))


def test_saved_model_loads_as_a_referrer_with_the_same_masks(
    trained: tuple[FitResult, Path], tmp_path: Path
) -> None:
    result, run_dir = trained
    module = result.module.eval()
    val_data = vlt_config(tmp_path / "d").val_data
    dataset = build_dataset(val_data.name, val_data.kwargs)
    batch = first_batch(module, dataset, count=6)
    probability = module.probability(batch)
    # A few dozen steps leave every probability under 0.35; compare masks at a threshold that cuts.
    threshold = float(probability.quantile(0.9))
    module.threshold = threshold
    expected = module.predict(batch)
    assert 0.0 < threshold < 1.0 and expected.any() and not expected.all()
    folder = save_trained_vlt(module, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    assert config["model"] == "vlt-tiny" and config["kwargs"]["input_size"] == 32
    assert np.allclose(config["preprocess"]["mean"], CLIP_MEAN) and np.allclose(
        config["preprocess"]["std"], CLIP_STD
    )
    exported = export_vlt(run_dir, tmp_path / "exported")  # the run folder's newest checkpoint
    for path in (folder, exported):
        referrer = langseg.load(path, threshold=threshold)
        assert isinstance(referrer, Referrer)
        for i in range(6):
            image = dataset[i]["image"].permute(1, 2, 0).numpy()
            got = referrer.refer(image, batch["text"][i], keep_scores=True)
            assert np.allclose(got.scores, probability[i].numpy(), atol=1e-5)
            assert np.array_equal(got.mask, expected[i].numpy())


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model=lseg-tiny", "'model'"),
        ("model=vlt-tinny", "'model'"),
        ("model_kwargs={querys: 2}", "'model_kwargs.querys'"),
        ("model_kwargs={num_queries: four}", "'model_kwargs.num_queries'"),
        ("model_kwargs={qbm: 1}", "'model_kwargs.qbm'"),
        ("model_kwargs={vocab: {min_cnt: 2}}", "'model_kwargs.vocab.min_cnt'"),
        ("model_kwargs={text: {vocab_size: 3}}", "'model_kwargs.text.vocab_size'"),
        ("model_kwargs={threshold: 1.5}", "'model_kwargs.threshold'"),
        ("model_kwargs={loss_reduction: sum}", "'model_kwargs.loss_reduction'"),
        ("model_kwargs={loss_resolution: pixels}", "'model_kwargs.loss_resolution'"),
        ("model_kwargs={query_source: words}", "query_source"),
        ("data.scale_range=[0.5, 2.0]", "'data.scale_range'"),
        ("data.crop_size=16", "'data.crop_size'"),
        ("data.name=shapeworld-semantic", "'data.name'"),
    ],
)
def test_bad_configs_name_the_key(tmp_path: Path, override: str, key: str) -> None:
    overrides = (
        [override, "data.kwargs={num_scenes: 4, size: 32}"] if override.startswith("data.name") else []
    )
    with pytest.raises(BadConfigError, match=key.replace(".", r"\.")) as info:
        build_vlt_referring(vlt_config(tmp_path / "bad", *(overrides or [override])))
    assert info.value.hint


def test_export_refuses_other_checkpoints(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"format": "langseg-train-checkpoint", "task": "toy-semantic", "model": {}}, path)
    with pytest.raises(BadDataError, match="vlt-referring"):
        export_vlt(path, tmp_path / "out")
    with pytest.raises(BadConfigError, match="no step"):
        export_vlt(tmp_path, tmp_path / "out")


def test_init_from_an_exported_folder_or_checkpoint_starts_from_its_weights(
    trained: tuple[FitResult, Path], tmp_path: Path
) -> None:
    result, _ = trained
    folder = result.module.export(tmp_path / "model")
    trained_state = {k: v.detach().clone() for k, v in result.module.net.named_parameters()}
    for source in (folder, result.checkpoint):
        # max_steps=1 at a learning rate of ~0: the weights after the run are the starting ones (batch
        # norm statistics move with the one training batch, so parameters only).
        out = tmp_path / f"fine-{Path(source).name}"
        config = vlt_config(out, "max_steps=1", f"init_from={source}", "optim.lr=1e-30")
        tuned = fit(config).module
        for key, value in tuned.net.named_parameters():
            torch.testing.assert_close(value, trained_state[key], rtol=0, atol=1e-6, msg=key)
        assert tuned.tokenizer.to_config() == result.module.tokenizer.to_config()
    # A network of another width does not fit: one clear error, nothing trained.
    wider = vlt_config(
        tmp_path / "wider", "max_steps=1", f"init_from={folder}", model_kwargs="hidden_dim: 24"
    )
    with pytest.raises(BadConfigError, match=r"init_from.*do not fit"):
        fit(wider)
    with pytest.raises(BadConfigError, match=r"init_from.*not found"):
        fit(vlt_config(tmp_path / "missing", "max_steps=1", f"init_from={tmp_path / 'nowhere'}"))
