"""Robustness of training configs, ``key=value`` overrides, YAML and ``model_kwargs`` (issue 13).

Every bad value must end in one :class:`BadConfigError` naming the dotted key (or the YAML source) before
any work, never a TypeError/RuntimeError from torch, an expanded alias bomb or a hang.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from langseg.errors import BadConfigError
from langseg.train.config import config_from_dict, load_config
from langseg.train.tasks import check_model_kwargs, get_task
from langseg.yamlio import MAX_DEPTH, MAX_NODES, load_yaml, read_yaml_file, short_repr
from tests.robust import ROBUST, expect_clean, run_cli

# --------------------------------------------------------------------------------- named examples


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("seed=-1", "seed"),
        ("seed=9223372036854775808", "seed"),  # 2**63: outside torch.manual_seed's range
        ("seed=" + "9" * 5000, "seed"),  # YAML's int() refuses it: still one clean message
        ("optim.lr=1e400", "optim.lr"),  # PyYAML reads a string, float("1e400") is inf
        ("optim.lr=1.0e400", "optim.lr"),  # PyYAML reads inf itself
        ("optim.lr=.inf", "optim.lr"),
        ("optim.lr=.nan", "optim.lr"),
        ("optim.lr=0", "optim.lr"),
        ("optim.betas=[0.9, 1.5]", "optim.betas[1]"),
        ("optim.betas=[-0.1, 0.99]", "optim.betas[0]"),
        ("optim.eps=0", "optim.eps"),
        ("optim.eps=-1e-8", "optim.eps"),
        ("optim.momentum=2", "optim.momentum"),
        ("optim.momentum=-0.5", "optim.momentum"),
        ("optim.weight_decay=.inf", "optim.weight_decay"),
        ("optim.warmup_steps=10000000000", "optim.warmup_steps"),
        ("epochs=10000000", "epochs"),
        ("max_steps=1000000000000", "max_steps"),
        ("max_steps=0", "max_steps"),
        ("data.crop_size=100000", "data.crop_size"),
        ("data.crop_size=0", "data.crop_size"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.batch_size=100000000", "data.batch_size"),
        ("data.scale_range=[1, 1000000000]", "data.scale_range"),
        ("data.scale_range=[0, 1]", "data.scale_range"),
        ("data.std=[0.2, .inf, 0.2]", "data.std"),
        ("data.ignore_index=-1", "data.ignore_index"),
        ("grad_accum_steps=0", "grad_accum_steps"),
        ("log_every=0", "log_every"),
        ("out_dir=''", "out_dir"),
    ],
)
def test_out_of_range_values_name_the_key(override: str, key: str) -> None:
    err = expect_clean("config", load_config, None, [override])
    assert isinstance(err, BadConfigError), f"{override} was accepted"
    assert repr(key) in err.message or key in err.message, err.message
    assert len(err.message) < 300, err.message


def test_in_range_values_are_kept() -> None:
    config = load_config(
        None,
        ["seed=9223372036854775807", "optim.betas=[0, 0.999]", "optim.momentum=1", "data.crop_size=8192"],
    )
    assert config.seed == 2**63 - 1 and config.optim.betas == (0.0, 0.999) and config.data.crop_size == 8192


@pytest.mark.parametrize(
    ("model_kwargs", "key"),
    [
        ({"width": 0}, "model_kwargs.width"),
        ({"width": -4}, "model_kwargs.width"),
        ({"width": 10**12}, "model_kwargs.width"),
        ({"width": 8.5}, "model_kwargs.width"),
        ({"dropout": 2}, "model_kwargs.dropout"),
        ({"dropout": -0.1}, "model_kwargs.dropout"),
        ({"dropout": "a lot"}, "model_kwargs.dropout"),
        ({"text": {"text_cfg": {"heads": 0}}}, "model_kwargs.text.text_cfg.heads"),
        ({"vit_kwargs": {"embed_dim": -1}}, "model_kwargs.vit_kwargs.embed_dim"),
        ({"widths": [8, 0, 32, 32]}, "model_kwargs.widths[1]"),
        ({"logit_scale": 0}, "model_kwargs.logit_scale"),
        ({"text": {"vocab_size": 10**9}}, "model_kwargs.text.vocab_size"),
    ],
)
def test_model_kwargs_out_of_range_name_the_key(model_kwargs: dict, key: str) -> None:
    err = expect_clean("config", check_model_kwargs, model_kwargs)
    assert isinstance(err, BadConfigError) and key in err.message, err


TINY_DATA = {"name": "shapeworld-semantic", "kwargs": {"num_scenes": 2, "size": 32}}


@pytest.mark.parametrize(
    ("task", "model", "model_kwargs"),
    [
        ("toy-semantic", "", {"width": 0}),
        ("toy-semantic", "", {"dropout": 2.0}),
        ("toy-semantic", "", {"width": True}),
        ("toy-semantic", "", {"dropout": "x"}),
        ("lseg-semantic", "lseg-tiny", {"features": 0}),
        ("lseg-semantic", "lseg-tiny", {"prompt": "a {0} {1}"}),
        ("lseg-semantic", "lseg-tiny", {"freeze_text": "no"}),
        ("lseg-semantic", "lseg-tiny", {"train_exclude_labels": "red circle"}),
        ("lseg-semantic", "lseg-tiny", {"readout": 3}),
    ],
)
def test_task_builders_refuse_bad_model_kwargs(task: str, model: str, model_kwargs: dict) -> None:
    config = config_from_dict({"task": task, "model": model, "model_kwargs": model_kwargs, "data": TINY_DATA})
    err = expect_clean("config", get_task(task), config)
    assert isinstance(err, BadConfigError), f"{model_kwargs} was accepted"
    assert "model_kwargs" in err.message, err.message


# --------------------------------------------------------------------------------- YAML


def bomb(width: int, levels: int) -> str:
    """A "billion laughs" document: ``width ** levels`` strings in a few hundred bytes."""
    lines = [f"a0: &a0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


NAMED_YAML: dict[str, str | bytes] = {
    "alias bomb": bomb(10, 9),
    "self-referencing alias": "seed: &a [*a]\n",
    "deeply nested flow": "model_kwargs: " + "[" * 100_000 + "]" * 100_000,
    "deeply nested block": "".join("  " * i + f"k{i}:\n" for i in range(200)) + "  " * 200 + "x: 1\n",
    "python object tag": "seed: !!python/object/apply:os.system ['echo hacked']\n",
    "python name tag": "task: !!python/name:os.system\n",
    "unparsable": "task: toy-semantic\n  optim: [1, 2\n",
    "tab indentation": "optim:\n\tlr: 0.1\n",
    "binary": bytes(range(256)) * 4,
    "not utf-8": "task: caf\u00e9\n".encode("latin-1"),
    "NUL bytes": b"task: toy\x00semantic\n",
    "integer too long": "seed: " + "7" * 5000 + "\n",
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", list(NAMED_YAML))
def test_bad_yaml_files_give_one_short_message(tmp_path: Path, name: str) -> None:
    path = tmp_path / "config.yaml"
    text = NAMED_YAML[name]
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    start = time.perf_counter()
    err = expect_clean("yaml", load_config, path)
    assert isinstance(err, BadConfigError), f"{name}: accepted"
    assert str(path) in err.message and len(err.message) < 300, err.message
    assert "lol, lol" not in err.message and "hacked" not in err.message
    assert time.perf_counter() - start < 20


def test_yaml_errors_say_where(tmp_path: Path) -> None:
    err = expect_clean("yaml", load_yaml, "a: 1\nb: [1, 2\n", "x.yaml")
    assert isinstance(err, BadConfigError) and "line" in err.message and "column" in err.message


@pytest.mark.parametrize("where", ["override", "data-arg"])
@pytest.mark.parametrize(
    "value",
    ["!!python/object/apply:os.system ['echo hacked']", "[1, 2", "{" + bomb(8, 8).replace("\n", ", ") + "}"],
)
def test_overrides_and_data_args_use_the_safe_loader(monkeypatch, capsys, where: str, value: str) -> None:
    if where == "override":
        err = expect_clean("yaml", load_config, None, [f"data.kwargs={{x: {value}}}"])
        assert isinstance(err, BadConfigError) and len(err.message) < 300, err
        assert "lol" not in value or "expands" in err.message, err.message
        return
    code, _, stderr = run_cli(
        "yaml", monkeypatch, capsys, "eval", "lseg-shapes", "--data", "shapeworld-semantic", "--data-arg",
        f"x={value}",
    )  # fmt: skip
    assert code == 2 and "--data-arg" in stderr and len(stderr) < 600, stderr
    assert "lol" not in value or "expands" in stderr, stderr


def test_read_yaml_file_refuses_folders_and_missing_files(tmp_path: Path) -> None:
    for path in (tmp_path, tmp_path / "missing.yaml", tmp_path / ("x" * 300 + ".yaml")):
        assert isinstance(expect_clean("yaml", read_yaml_file, path), BadConfigError)


def test_short_repr_is_bounded() -> None:
    shared: list = ["lol"] * 10
    for _ in range(12):
        shared = [shared] * 10  # 10**13 leaves if expanded
    assert len(short_repr(shared)) <= 80 and short_repr(10**5000).startswith("<an integer")


# --------------------------------------------------------------------------------- generated

KEYS = [
    "seed", "epochs", "max_steps", "grad_accum_steps", "log_every", "checkpoint_every", "eval_every",
    "keep_checkpoints", "precision", "device", "task", "model", "out_dir", "optim.lr", "optim.momentum",
    "optim.betas", "optim.eps", "optim.weight_decay", "optim.name", "optim.warmup_steps",
    "optim.grad_clip_norm", "data.batch_size", "data.crop_size", "data.scale_range", "data.mean",
    "data.std", "data.ignore_index", "data.num_workers", "data.hflip", "model_kwargs", "data.kwargs",
    "val_data", "optim", "data.name", "nonsense", "optim.lr.x",
]  # fmt: skip
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


def _nest(key: str, value: object) -> dict:
    head, _, rest = key.partition(".")
    return {head: _nest(rest, value) if rest else value}


@settings(parent=ROBUST, max_examples=60)
@given(key=st.sampled_from(KEYS), value=VALUES)
def test_generated_config_dicts(key: str, value: object) -> None:
    result = expect_clean("config", config_from_dict, _nest(key, value))
    if isinstance(result, BadConfigError):
        assert len(result.message) < 400, result.message
    else:  # accepted: every number in it is finite and in range
        assert math.isfinite(result.optim.lr) and 0 <= result.seed < 2**63


YAML_VALUE_TEXT = st.one_of(
    st.text(alphabet="[]{}:,-&*!|>'\"#%@`0123456789.eE+-ainfNT \n\t", max_size=30),
    st.sampled_from(
        ["1e400", ".inf", "-.inf", ".nan", "0x10", "0o7", "1_000", "~", "!!binary aGk=", "[1, 2]"]
    ),
)


@settings(parent=ROBUST, max_examples=60)
@given(key=st.sampled_from(KEYS), text=YAML_VALUE_TEXT)
def test_generated_override_strings(key: str, text: str) -> None:
    result = expect_clean("config", load_config, None, [f"{key}={text}"])
    if isinstance(result, BadConfigError):
        assert len(result.message) < 400, result.message


@settings(parent=ROBUST, max_examples=30)
@given(data=st.binary(max_size=200))
def test_generated_yaml_bytes(data: bytes) -> None:
    expect_clean("yaml", load_yaml, data, "random.yaml")


@settings(parent=ROBUST, max_examples=25)
@given(width=st.integers(2, 12), levels=st.integers(1, 12))
def test_generated_alias_bombs_are_refused_before_expanding(width: int, levels: int) -> None:
    start = time.perf_counter()
    result = expect_clean("yaml", load_yaml, bomb(width, levels), "bomb.yaml")
    expanded = sum(width**i for i in range(1, levels + 2)) + levels + 1
    if expanded > 2 * MAX_NODES:  # keys, mappings and the lists' own nodes make the exact count fuzzy
        assert isinstance(result, BadConfigError) and "expands" in result.message, result
        assert "lol" not in result.message
    elif expanded < MAX_NODES // 4:
        assert isinstance(result, dict) and len(result) == levels + 1
    assert time.perf_counter() - start < 5


@settings(parent=ROBUST, max_examples=20)
@given(depth=st.integers(1, 5000), flow=st.booleans())
def test_generated_nesting(depth: int, flow: bool) -> None:
    text = (
        "[" * depth + "]" * depth
        if flow
        else "".join("  " * i + "k:\n" for i in range(depth)) + "  " * depth + "1"
    )
    if not flow and depth > 600:
        text = text[:200_000]  # block nesting grows quadratically; cut, still deep
    result = expect_clean("yaml", load_yaml, text, "deep.yaml")
    if depth > MAX_DEPTH + 1:
        assert isinstance(result, BadConfigError), f"depth {depth} accepted"
    elif flow:
        assert not isinstance(result, BadConfigError), result


SIZE_KEYS = ["width", "features", "embed_dim", "hidden_dim", "num_heads", "layers", "depth", "input_size"]


@settings(parent=ROBUST, max_examples=30)
@given(
    key=st.sampled_from([*SIZE_KEYS, "dropout", "attention_dropout", "drop_path_rate"]),
    value=st.one_of(st.integers(-(2**40), 2**40), st.floats(), st.booleans(), st.text(max_size=4)),
    nested=st.booleans(),
)
def test_generated_model_kwargs(key: str, value: object, nested: bool) -> None:
    kwargs = {"text": {key: value}} if nested else {key: value}
    result = expect_clean("config", check_model_kwargs, kwargs)
    ok_size = isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 8192
    ok_drop = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1
    if key in SIZE_KEYS:
        assert (result is None) == ok_size, (kwargs, result)
    else:
        assert (result is None) == ok_drop, (kwargs, result)
