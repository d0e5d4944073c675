"""Training configs: YAML onto dataclasses, dotted overrides, and errors that name the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from langseg.errors import BadConfigError
from langseg.train.config import (
    CLIP_MEAN,
    DataConfig,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    load_config,
)

ROOT = Path(__file__).resolve().parents[1]

RECIPE = """
task: toy-semantic
model_kwargs: {width: 8}
data:
  name: shapeworld-semantic
  kwargs: {num_scenes: 10, size: 32}
  batch_size: 4
  scale_range: [0.5, 1.5]
optim:
  name: adamw
  lr: 1e-3          # PyYAML reads this as a string: float keys accept it
epochs: 3
"""


def write(tmp_path: Path, text: str = RECIPE) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_yaml_maps_onto_dataclasses_and_overrides_apply_in_order(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path),
        [
            "optim.lr=0.05",
            "data.kwargs.seed=7",
            "data.hflip=false",
            "max_steps=12",
            "val_data.batch_size=2",  # creates the section with defaults
            "precision=bf16",
            "optim.grad_clip_norm=1",  # an int where a float is wanted is fine
            "optim.lr=2e-2",  # the last override wins
        ],
    )
    assert isinstance(config, TrainConfig) and isinstance(config.data, DataConfig)
    assert config.optim.name == "adamw" and config.optim.lr == pytest.approx(0.02)
    assert config.optim.momentum == pytest.approx(0.9) and config.optim.head_lr_mult == pytest.approx(10.0)
    assert config.data.kwargs == {"num_scenes": 10, "size": 32, "seed": 7}
    assert config.data.scale_range == (0.5, 1.5) and config.data.hflip is False
    assert config.data.mean == CLIP_MEAN
    assert config.val_data is not None and config.val_data.batch_size == 2
    assert config.epochs == 3 and config.max_steps == 12 and config.precision == "bf16"
    assert config.optim.grad_clip_norm == pytest.approx(1.0)
    assert config.model_kwargs == {"width": 8}
    # Plain data round-trips (what checkpoints and out_dir/config.yaml store).
    assert config_from_dict(config_to_dict(config)) == config
    assert load_config(write(tmp_path), ["val_data=null"]).val_data is None


def test_defaults_without_a_file_and_the_shipped_recipe_loads() -> None:
    assert load_config(None) == TrainConfig()
    recipe = load_config(ROOT / "configs" / "toy_shapes.yaml")
    assert recipe.task == "toy-semantic" and recipe.val_data is not None


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_recipe_loads_and_names_a_registered_model(recipe: str) -> None:
    import langseg.train  # noqa: F401  (registers the tasks)
    from langseg.registry import get_model_entry
    from langseg.train.tasks import get_task

    config = load_config(ROOT / "configs" / recipe)
    get_task(config.task)
    if config.task != "toy-semantic":  # the toy task names its own small networks
        assert get_model_entry(config.model or "").family == config.task.split("-")[0]


@pytest.mark.parametrize(
    ("yaml_text", "overrides", "key", "valid"),
    [
        (RECIPE + "epochz: 3\n", [], "'epochz'", "epochs"),
        (RECIPE, ["optim.lrr=0.1"], "'optim.lrr'", "head_lr_mult"),
        (RECIPE, ["data.crop=32"], "'data.crop'", "crop_size"),
        (RECIPE, ["val_data.bogus=1"], "'val_data.bogus'", "batch_size"),
    ],
)
def test_unknown_keys_are_named_with_the_valid_ones(tmp_path, yaml_text, overrides, key, valid) -> None:
    with pytest.raises(BadConfigError) as info:
        load_config(write(tmp_path, yaml_text), overrides)
    assert key in info.value.message
    assert valid in info.value.hint


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.batch_size=abc", "data.batch_size"),
        ("data.batch_size=2.5", "data.batch_size"),
        ("data.hflip=3", "data.hflip"),
        ("optim.lr=fast", "optim.lr"),
        ("optim.name=adam", "optim.name"),
        ("precision=fp8", "precision"),
        ("data.scale_range=[1, 2, 3]", "data.scale_range"),
        ("data.kwargs=5", "data.kwargs"),
        ("optim=3", "optim"),
        ("max_steps=many", "max_steps"),
        ("data.batch_size=0", "data.batch_size"),  # range checks name the section too
        ("val_data.batch_size=-1", "val_data.batch_size"),
        ("optim.lr=-1", "optim.lr"),
        ("data.scale_range=[2, 1]", "data.scale_range"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, override: str, key: str) -> None:
    with pytest.raises(BadConfigError) as info:
        load_config(write(tmp_path), [override])
    assert f"'{key}'" in info.value.message
    assert info.value.hint


@pytest.mark.parametrize("override", ["lr", "=3", "optim..lr=1", "data.batch_size.x=1"])
def test_malformed_overrides(tmp_path: Path, override: str) -> None:
    with pytest.raises(BadConfigError):
        load_config(write(tmp_path), [override])


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(BadConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(BadConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "data: [unclosed\n"))
    with pytest.raises(BadConfigError, match="mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))
