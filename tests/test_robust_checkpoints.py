"""Robustness of model folders, weight files, training checkpoints and resume (issue 13).

Generated bad inputs: config.json contents (random JSON values and bytes, and the real config with one
value replaced), byte corruptions and truncations of real safetensors files, tensors of the wrong shape
or dtype, NaN/inf weights in every family, keys deleted from or damaged in a real training checkpoint,
and torn metrics.jsonl tails. Each must end in a correct result or a clean ``LangsegError`` naming the
file (``expect_clean``), never a traceback; a model folder never makes langseg open a file outside it.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import langseg
import langseg.hub.files
from langseg import hub
from langseg.convert import convert_lseg_official
from langseg.errors import BadConfigError, BadDataError, LangsegError
from langseg.train import checkpoint as ckpt
from langseg.train import fit, load_config
from langseg.train.engine import FitResult
from tests.robust import ROBUST, expect_clean
from tests.test_dense_clip_predict import TINY as TINY_CLIP
from tests.test_dense_clip_predict import ckpt as clip_ckpt  # noqa: F401 - a fixture used below
from tests.test_lseg_convert import TINY as TINY_LSEG
from tests.test_lseg_convert import _write_ckpt

pytestmark = pytest.mark.usefixtures("one_thread")

VLT = hub.BUNDLED_DIR / "vlt-shapes"
LSEG = hub.BUNDLED_DIR / "lseg-shapes"
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
# Replacement values for the real config: small numbers (a depth of 10**9 would build for ever, even on
# the meta device; sizes are the config validation's business) and every other kind of JSON value.
SMALL_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 40) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


def copy_folder(source: Path, target: Path) -> Path:
    shutil.rmtree(target, ignore_errors=True)
    return Path(shutil.copytree(source, target))


def assert_names(result: Any, *names: str) -> None:
    """``result`` is a clean error whose message names each of ``names`` (the file or the key)."""
    assert isinstance(result, LangsegError), result
    for name in names:
        assert name in result.message, (name, result.message)


def assert_no_unsafe_advice(err: LangsegError) -> None:
    text = err.message + " " + err.hint
    assert "\x1b" not in text, text  # no terminal colour codes
    assert "weights_only=False" not in text and "set to `False`" not in text, text


# ------------------------------------------------------------------------- model folders: config.json
CONFIG_EXAMPLES = {
    "a list": b"[1, 2, 3]",
    "a string": b'"vlt-shapes"',
    "a number": b"3",
    "null": b"null",
    "not UTF-8": b'{"model": "vlt-shapes\xff\xfe"}',
    "nested 100000 deep": b"[" * 100_000 + b"]" * 100_000,
    "not JSON": b'{"model": ',
    "empty": b"",
    "an integer of 5000 digits": b'{"model": ' + b"9" * 5000 + b"}",
}


@pytest.mark.parametrize("example", CONFIG_EXAMPLES)
def test_issue_examples_of_bad_config_json(tmp_path: Path, example: str) -> None:
    folder = copy_folder(VLT, tmp_path / "model")
    (folder / "config.json").write_bytes(CONFIG_EXAMPLES[example])
    for call in (hub.read_checkpoint, hub.read_config):
        assert_names(expect_clean("checkpoint", call, folder), str(folder / "config.json"))
    result = expect_clean("checkpoint", langseg.create_model, "vlt-shapes", weights=folder)
    assert_names(result, "config.json")


def test_a_huge_config_json_is_refused_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = copy_folder(VLT, tmp_path / "model")
    monkeypatch.setattr(langseg.hub.files, "MAX_CONFIG_BYTES", 1000)
    (folder / "config.json").write_bytes(b" " * 1001 + b"{}")
    assert_names(expect_clean("checkpoint", hub.read_checkpoint, folder), "too large")


@pytest.mark.parametrize("model", [3, None, [], ["vlt-shapes"], {"a": 1}, "", "no-such-model"])
def test_model_key_of_the_wrong_kind(tmp_path: Path, model: object) -> None:
    folder = copy_folder(VLT, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model": model}))
    result = expect_clean("checkpoint", langseg.load, folder)
    assert isinstance(result, LangsegError), result
    # create_model with an explicit name builds from the folder's kwargs: the name there is not needed.
    assert isinstance(
        expect_clean("checkpoint", langseg.create_model, "vlt-shapes", weights=folder), torch.nn.Module
    )


@pytest.mark.parametrize("key", ["kwargs", "tokenizer", "preprocess", "family"])
@pytest.mark.parametrize("value", [[1], "x", 3, True])
def test_config_sections_of_the_wrong_kind(tmp_path: Path, key: str, value: object) -> None:
    folder = copy_folder(VLT, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, key: value}))
    result = expect_clean("checkpoint", langseg.load, folder)
    assert_names(result, "config.json")


@settings(parent=ROBUST, max_examples=40)
@given(document=JSON)
def test_random_json_as_config(tmp_path: Path, document: Any) -> None:
    folder = copy_folder(VLT, tmp_path / "model")
    (folder / "config.json").write_text(json.dumps(document))
    result = expect_clean("checkpoint", langseg.create_model, "vlt-shapes", weights=folder)
    # Only an object that keeps the real kwargs and tokenizer could load; random JSON never does.
    assert_names(result, str(folder))


@settings(parent=ROBUST, max_examples=30)
@given(data=st.binary(max_size=200))
def test_random_bytes_as_config(tmp_path: Path, data: bytes) -> None:
    folder = copy_folder(VLT, tmp_path / "model")
    (folder / "config.json").write_bytes(data)
    result = expect_clean("checkpoint", hub.read_checkpoint, folder)
    if isinstance(result, LangsegError):
        assert str(folder / "config.json") in result.message
    else:  # bytes that happen to be a JSON object
        assert isinstance(json.loads(data.decode("utf-8-sig")), dict)


VLT_CONFIG = json.loads((VLT / "config.json").read_text())
CONFIG_PATHS = (
    [("kwargs", k) for k in VLT_CONFIG["kwargs"]]
    + [("kwargs", "text", k) for k in VLT_CONFIG["kwargs"]["text"]]
    + [("tokenizer", k) for k in VLT_CONFIG["tokenizer"]]
    + [("preprocess", "mean"), ("preprocess", "std")]
)


@settings(parent=ROBUST, max_examples=40)
@given(where=st.sampled_from(CONFIG_PATHS), value=SMALL_JSON, delete=st.booleans())
def test_one_value_of_the_real_config_replaced(
    tmp_path: Path, where: tuple[str, ...], value: Any, delete: bool
) -> None:
    folder = copy_folder(VLT, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    parent = config
    for key in where[:-1]:
        parent = parent[key]
    if delete:
        del parent[where[-1]]
    else:
        parent[where[-1]] = value
    (folder / "config.json").write_text(json.dumps(config))
    result = expect_clean("checkpoint", langseg.load, folder)
    if not isinstance(result, LangsegError):  # a value that does not matter, or one with the same effect
        image = torch.zeros(64, 64, 3, dtype=torch.uint8).numpy()
        out = expect_clean("checkpoint", result.refer, image, "the circle")
        assert isinstance(out, LangsegError) or out.mask.shape == (64, 64)


# ------------------------------------------------------------------------- model folders: safetensors
@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small langseg checkpoint written by the one writer: floats, halves and integers."""
    torch.manual_seed(0)
    state = {"a.weight": torch.randn(8, 4), "a.bias": torch.randn(8).half(), "steps": torch.arange(5)}
    return hub.save_checkpoint(state, tmp_path_factory.mktemp("small") / "ckpt", {"model": "toy"})


@pytest.mark.parametrize("length", [0, 1, 7, 8, 9, 100, -1])
def test_empty_and_truncated_safetensors(tmp_path: Path, small_checkpoint: Path, length: int) -> None:
    folder = copy_folder(small_checkpoint, tmp_path / "model")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:length])
    assert_names(expect_clean("checkpoint", hub.read_checkpoint, folder), "model.safetensors")


@settings(parent=ROBUST, max_examples=60)
@given(data=st.data())
def test_random_corruption_of_a_safetensors_file(
    tmp_path: Path, small_checkpoint: Path, data: st.DataObject
) -> None:
    folder = copy_folder(small_checkpoint, tmp_path / "model")
    raw = bytearray((folder / "model.safetensors").read_bytes())
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1), label="length")]
    if raw:
        flips = data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)), max_size=6))
        for position, value in flips:
            raw[position] = value
    (folder / "model.safetensors").write_bytes(bytes(raw))
    result = expect_clean("checkpoint", hub.read_checkpoint, folder)
    if isinstance(result, LangsegError):
        assert "model.safetensors" in result.message
    else:  # only flips in the data can leave a readable file, and then every tensor is finite
        state, _ = result
        assert all(torch.isfinite(v.float()).all() for v in state.values())


HEADER = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "F8_E4M3", "U8", "X9", ""]),
        "shape": st.lists(st.integers(-2, 2**40), max_size=3),
        "data_offsets": st.lists(st.integers(-1, 2**40), min_size=0, max_size=3),
    }
)


@settings(parent=ROBUST, max_examples=40)
@given(header=HEADER, payload=st.binary(max_size=64))
def test_a_safetensors_header_that_lies(tmp_path: Path, header: dict, payload: bytes) -> None:
    folder = tmp_path / "model"  # the same folder for every example: each overwrites both files
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text('{"model": "toy"}')
    body = json.dumps({"w": header}).encode()
    (folder / "model.safetensors").write_bytes(len(body).to_bytes(8, "little") + body + payload)
    result = expect_clean("checkpoint", hub.read_checkpoint, folder)
    if isinstance(result, LangsegError):
        assert "model.safetensors" in result.message


VLT_STATE = hub.read_checkpoint(VLT)[0]


@settings(parent=ROBUST, max_examples=20)
@given(key=st.sampled_from(sorted(VLT_STATE)), how=st.sampled_from(["shape", "dtype", "delete", "extra"]))
def test_wrong_tensors_name_the_first_mismatching_key(tmp_path: Path, key: str, how: str) -> None:
    folder = copy_folder(VLT, tmp_path / "model")
    state = dict(VLT_STATE)
    if how == "shape":
        state[key] = torch.zeros(*state[key].shape, 2)
    elif how == "dtype":
        state[key] = torch.ones(
            state[key].shape, dtype=torch.bool if state[key].is_floating_point() else torch.float32
        )
    elif how == "delete":
        del state[key]
    else:
        key = key + ".extra"
        state[key] = torch.zeros(1)
    save_file(state, str(folder / "model.safetensors"))
    for call in (lambda: langseg.create_model("vlt-shapes", weights=folder), lambda: langseg.load(folder)):
        result = expect_clean("checkpoint", call)
        assert isinstance(result, BadDataError) and repr(key) in result.message, result


# ------------------------------------------------------------------------- NaN / inf in every family
@settings(parent=ROBUST, max_examples=15)
@given(key=st.sampled_from(sorted(k for k, v in VLT_STATE.items() if v.is_floating_point())),
       value=st.sampled_from([math.nan, math.inf, -math.inf]))  # fmt: skip
def test_nan_weights_in_a_vlt_folder(tmp_path: Path, key: str, value: float) -> None:
    folder = copy_folder(VLT, tmp_path / "model")
    state = dict(VLT_STATE)
    state[key] = state[key].clone().view(-1).index_fill(0, torch.tensor([0]), value).view(state[key].shape)
    save_file(state, str(folder / "model.safetensors"))
    for call in (hub.read_checkpoint, langseg.load):
        result = expect_clean("checkpoint", call, folder)
        assert isinstance(result, BadDataError) and key in result.message and "NaN" in result.message


def test_nan_weights_in_an_lseg_folder(tmp_path: Path) -> None:
    state, config = hub.read_checkpoint(LSEG)
    state["net.head.weight"] = torch.full_like(state["net.head.weight"], math.nan)
    folder = hub.save_checkpoint(state, tmp_path / "lseg", config)
    result = expect_clean("checkpoint", langseg.load, folder)
    assert isinstance(result, BadDataError) and "net.head.weight" in result.message


def test_nan_weights_in_an_official_lseg_checkpoint(tmp_path: Path) -> None:
    _write_ckpt(tmp_path / "official.ckpt", TINY_LSEG)
    saved = torch.load(tmp_path / "official.ckpt", weights_only=True)
    key = "net.scratch.head1.weight"
    saved["state_dict"][key] = torch.full_like(saved["state_dict"][key], math.inf)
    torch.save(saved, tmp_path / "official.ckpt")
    result = expect_clean(
        "checkpoint", convert_lseg_official, tmp_path / "official.ckpt", tmp_path / "out", "lseg-tiny"
    )
    assert isinstance(result, BadDataError) and key in result.message
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_nan_weights_in_an_open_clip_file(tmp_path: Path, clip_ckpt: dict[str, Path], fmt: str) -> None:  # noqa: F811
    state = torch.load(clip_ckpt["bin"], weights_only=True)
    key = next(k for k in state if k.endswith("proj") or k.endswith("weight"))
    state[key] = torch.full_like(state[key], math.nan)
    path = tmp_path / f"nan.{fmt}"
    torch.save(state, path) if fmt == "bin" else save_file(state, str(path))
    result = expect_clean("checkpoint", langseg.load, f"naclip:{TINY_CLIP}", weights=path)
    assert isinstance(result, BadDataError) and key in result.message


# ------------------------------------------------------------------------- security
@pytest.fixture(scope="module")
def legacy_lseg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """lseg-shapes in langseg 0.1's layout: two safetensors files that config.json names."""
    folder = tmp_path_factory.mktemp("legacy")
    state, config = hub.read_checkpoint(LSEG)
    for prefix, name in (("net.", "net.safetensors"), ("text_encoder.", "text.safetensors")):
        part = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        save_file(part, str(folder / name))
    config = {
        **config,
        "weights": "net.safetensors",
        "text_encoder": {**config["text_encoder"], "weights": "text.safetensors"},
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_legacy_layout_inside_its_folder_loads(legacy_lseg: Path) -> None:
    result = expect_clean("checkpoint", langseg.load, legacy_lseg)
    assert not isinstance(result, LangsegError), result


OUTSIDE = [
    "../../../etc/hostname",
    "/etc/hostname",
    "sub/../../outside.safetensors",
    "~/x.safetensors",
    3,
    None,
    "",
]


@pytest.mark.parametrize("name", [*OUTSIDE, "symlink"])
@pytest.mark.parametrize("key", ["weights", "text_encoder.weights"])
def test_paths_in_a_model_folder_stay_inside_it(
    tmp_path: Path, legacy_lseg: Path, monkeypatch: pytest.MonkeyPatch, name: object, key: str
) -> None:
    folder = copy_folder(legacy_lseg, tmp_path / "model")
    outside = tmp_path / "outside.safetensors"
    shutil.copy(folder / "net.safetensors", outside)  # a real weights file, so only the path check stops it
    if name == "symlink":
        (folder / "link.safetensors").symlink_to(outside)
        name = "link.safetensors"
    config = json.loads((folder / "config.json").read_text())
    if key == "weights":
        config["weights"] = name
    else:
        config["text_encoder"]["weights"] = name or "x"  # falsy: not the legacy layout any more
    (folder / "config.json").write_text(json.dumps(config))
    opened: list[str] = []
    real = langseg.hub.files.load_file
    monkeypatch.setattr(
        langseg.hub.files, "load_file", lambda path, *a, **k: opened.append(path) or real(path, *a, **k)
    )
    result = expect_clean("checkpoint", langseg.load, folder)
    assert isinstance(result, LangsegError), result
    resolved = folder.resolve()
    assert all(Path(p).resolve().is_relative_to(resolved) for p in opened), opened


class Exploit:
    def __reduce__(self) -> tuple:
        return (os.system, ("echo pickled code ran",))


@pytest.fixture
def evil(tmp_path: Path) -> Path:
    path = tmp_path / "evil.pt"
    torch.save({"format": ckpt.FORMAT, "model": {}, "payload": Exploit()}, path)
    return path


def test_refused_pickles_say_so_without_unsafe_advice(
    evil: Path,
    tmp_path: Path,
    clip_ckpt: dict[str, Path],  # noqa: F811 - registers the tiny open_clip architecture
    capfd: pytest.CaptureFixture,
) -> None:
    from langseg.convert.lseg_official import read_official_checkpoint

    raw = tmp_path / "raw.pkl"  # a plain pickle (not torch's zip): torch's other message
    raw.write_bytes(pickle.dumps({"x": Exploit()}))
    calls = [
        (hub.torch_load_safely, evil),
        (hub.torch_load_safely, raw),
        (ckpt.load_checkpoint, evil),
        (read_official_checkpoint, evil),
        (lambda p: langseg.load(f"naclip:{TINY_CLIP}", weights=p), evil),
    ]
    for call, path in calls:
        result = expect_clean("checkpoint", call, path)
        assert isinstance(result, BadDataError) and "refuses" in result.message, result
        assert "posix.system" in result.message or "os.system" in result.message or path == raw, result
        assert_no_unsafe_advice(result)
    assert "pickled code ran" not in capfd.readouterr().out


@pytest.mark.parametrize("value", [3, 3.5, None, b"model", ["a"], "", "\x00"])
def test_a_non_path_where_a_path_belongs(value: object) -> None:
    calls = [hub.read_checkpoint, hub.read_config, hub.torch_load_safely, ckpt.load_checkpoint]
    if value is not None:  # resolve_weights(path=None) means "no local path": the entry's own weights
        calls.append(lambda v: hub.resolve_weights(None, "x", v))
    for call in calls:
        result = expect_clean("checkpoint", call, value)
        assert isinstance(result, BadConfigError) and "path" in result.message, result


def test_torch_load_is_only_called_in_the_safe_reader() -> None:
    source = Path(langseg.__file__).parent
    calls = [p for p in source.rglob("*.py") if "torch.load(" in p.read_text().replace("``torch.load(", "")]
    assert calls == [source / "hub" / "files.py"], calls


# ------------------------------------------------------------------------- training checkpoints, resume
def toy_config(out_dir: Path, *overrides: str):
    base = [
        f"out_dir={out_dir}",
        "device=cpu",
        "progress=false",
        "data.kwargs={num_scenes: 8, size: 32, granularity: colour}",
        "data.batch_size=2",
        "model_kwargs={width: 4}",
        "max_steps=2",
        "checkpoint_every=1",
        "log_every=1",
    ]
    return load_config(None, [*base, *overrides])


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-step toy run: checkpoints at steps 1 and 2, two log lines."""
    out = tmp_path_factory.mktemp("run") / "run"
    fit(toy_config(out))
    return out


def nested_paths(value: Any, prefix: tuple = (), depth: int = 3) -> list[tuple]:
    """Every key path into the nested dicts/lists of ``value``, down to ``depth`` levels."""
    out = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, inner in items:
        out.append((*prefix, key))
        if depth > 1:
            out += nested_paths(inner, (*prefix, key), depth - 1)
    return out


@pytest.fixture(scope="module")
def saved(run: Path) -> dict[str, Any]:
    return torch.load(run / "checkpoints" / "step_00000001.pt", weights_only=True)


@pytest.mark.parametrize(
    "key", ["model", "rng", "optimizer", "scheduler", "scaler", "state", "layout", "task"]
)
def test_resume_checkpoint_missing_a_key_names_it(tmp_path: Path, saved: dict, key: str) -> None:
    path = tmp_path / "step_00000001.pt"
    torch.save({k: v for k, v in saved.items() if k != key}, path)
    result = expect_clean("resume", fit, toy_config(tmp_path / "out"), resume=path)
    assert isinstance(result, BadDataError) and repr(key) in result.message, result


DAMAGE = st.sampled_from(["delete", "none", "string", "list", "nan", "huge", "negative", "tensor"])


@settings(parent=ROBUST, max_examples=50)
@given(data=st.data(), damage=DAMAGE)
def test_damaged_resume_checkpoints(tmp_path: Path, saved: dict, data: st.DataObject, damage: str) -> None:
    paths = [p for p in nested_paths(saved) if p[0] not in ("config", "format")]
    where = data.draw(st.sampled_from(paths), label="where")
    state = _deep_copy(saved)
    parent = state
    for key in where[:-1]:
        parent = parent[key]
    replacement = {"none": None, "string": "x", "list": [1, 2], "nan": math.nan, "huge": 2**70,
                   "negative": -5, "tensor": torch.zeros(3, 1)}.get(damage)  # fmt: skip
    if damage == "delete" and isinstance(parent, dict):
        del parent[where[-1]]
    else:
        parent[where[-1]] = replacement
    path = tmp_path / "step_00000001.pt"
    torch.save(state, path)
    result = expect_clean("resume", fit, toy_config(tmp_path / "out"), resume=path)
    # Accepted only where the value is not used (e.g. a scheduler flag) or still makes sense.
    assert isinstance(result, (LangsegError, FitResult))


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value.clone() if isinstance(value, torch.Tensor) else value


def test_nan_weights_in_a_training_checkpoint(tmp_path: Path, saved: dict) -> None:
    state = _deep_copy(saved)
    key = next(iter(state["model"]))
    state["model"][key] = torch.full_like(state["model"][key], math.nan)
    torch.save(state, tmp_path / "step_00000001.pt")
    result = expect_clean("resume", fit, toy_config(tmp_path / "out"), resume=tmp_path / "step_00000001.pt")
    assert isinstance(result, BadDataError) and key in result.message


TORN = st.one_of(
    st.binary(min_size=1, max_size=40).filter(lambda b: b"\n" not in b),
    st.integers(1, 60).map(
        lambda n: json.dumps({"kind": "train", "step": 3, "loss": 0.5, "lr": 0.01, "time": 1.0}).encode()[:n]
    ),
)


@settings(parent=ROBUST, max_examples=25)
@given(tail=TORN)
def test_a_torn_last_line_in_metrics_does_not_stop_resume_auto(
    tmp_path: Path, run: Path, tail: bytes
) -> None:
    out = copy_folder(run, tmp_path / "run")
    (out / "checkpoints" / "step_00000002.pt").unlink()  # resume from step 1: the log is cut back to it
    log = out / "metrics.jsonl"
    log.write_bytes(log.read_bytes() + tail)
    result = expect_clean("resume", fit, toy_config(out), resume="auto")
    assert isinstance(result, FitResult) and result.state.step == 2, result
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]


@settings(parent=ROBUST, max_examples=10)
@given(junk=st.binary(min_size=1, max_size=30).filter(lambda b: b"\n" not in b and b.strip()))
def test_a_torn_line_in_the_middle_of_metrics_is_a_clean_error(
    tmp_path: Path, run: Path, junk: bytes
) -> None:
    out = copy_folder(run, tmp_path / "run")
    log = out / "metrics.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(lines[0] + junk + b"\n" + b"".join(lines[1:]))
    result = expect_clean("resume", fit, toy_config(out), resume="auto")
    if isinstance(result, LangsegError):
        assert "metrics.jsonl, line 2" in result.message
    else:  # junk that is a JSON object with an integer step is a record
        assert isinstance(json.loads(junk), dict)


def test_stale_checkpoint_temporaries_are_removed_and_nothing_else(tmp_path: Path, run: Path) -> None:
    out = copy_folder(run, tmp_path / "run")
    folder = out / "checkpoints"
    stale = [folder / ".step_00000003.pt.k2j4_x9.tmp", folder / ".step_00000009.pt.a.tmp"]
    kept = [
        folder / "notes.tmp",
        folder / ".step_3.pt",
        folder / "step_00000003.pt.x.tmp",
        out / ".step_00000003.pt.ab.tmp",
    ]
    for path in stale + kept:
        path.write_bytes(b"PK\x03\x04 partial")
    result = expect_clean("resume", fit, toy_config(out, "max_steps=3"), resume="auto")
    assert isinstance(result, FitResult) and result.state.step == 3
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def test_stale_model_folder_temporaries_are_removed(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    stale, own, other = (
        folder / ".model.safetensors.999999999.tmp",
        folder / ".config.json.1.tmp",
        folder / "x.tmp",
    )
    for path in (stale, own, other):
        path.write_bytes(b"partial")
    hub.save_checkpoint({"w": torch.ones(2)}, folder, {"model": "toy"})
    assert not stale.exists() and not own.exists() and other.exists()
