"""Weights resolution and checkpoint files: explicit path > cache > download; safe loading."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from langseg.errors import BadDataError, MissingWeightsError, OutputError
from langseg.hub import read_checkpoint, resolve_weights, save_checkpoint, torch_load_safely
from langseg.registry import WeightsSpec


def test_explicit_path_then_cache_then_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LANGSEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = WeightsSpec(repo="langseg/some-model", filename="model.safetensors")
    explicit = tmp_path / "mine.safetensors"
    explicit.write_bytes(b"x")
    assert resolve_weights(spec, "some-model", explicit) == explicit

    with pytest.raises(MissingWeightsError) as info:
        resolve_weights(spec, "some-model")
    # The message names the file; the hint says where the cache is and how to pass a local file.
    assert "model.safetensors" in info.value.message
    assert str(tmp_path / "cache") in info.value.hint and "local checkpoint" in info.value.hint

    cached = tmp_path / "cache" / "some-model" / "model.safetensors"
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(b"y")
    assert resolve_weights(spec, "some-model") == cached

    with pytest.raises(MissingWeightsError, match="no published weights"):
        resolve_weights(None, "tiny")
    with pytest.raises(MissingWeightsError, match="not found"):
        resolve_weights(spec, "some-model", tmp_path / "absent.pt")


def test_bundled_weights_are_found_in_the_package_and_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib

    import langseg.hub as hub

    monkeypatch.setattr(hub, "BUNDLED_DIR", tmp_path)
    data = b"weights"
    spec = WeightsSpec(None, "model.safetensors", sha256=hashlib.sha256(data).hexdigest())
    with pytest.raises(MissingWeightsError, match="missing from the install"):
        resolve_weights(spec, "shipped")
    (tmp_path / "shipped").mkdir()
    (tmp_path / "shipped" / "model.safetensors").write_bytes(data)
    assert resolve_weights(spec, "shipped") == tmp_path / "shipped" / "model.safetensors"
    (tmp_path / "shipped" / "model.safetensors").write_bytes(b"weightz")
    with pytest.raises(BadDataError, match="sha256"):
        resolve_weights(spec, "shipped")


def test_checkpoint_round_trip_with_tied_weights(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5, bias=False))
    model[1].weight = model[0].weight  # tied, as text towers often are
    out = save_checkpoint(model, tmp_path / "ckpt", {"model": "toy", "kwargs": {"width": 3}})
    state, config = read_checkpoint(out)
    assert config == {"model": "toy", "kwargs": {"width": 3}}
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value)
    assert set(load_file(str(out / "model.safetensors"))) == set(model.state_dict())
    # The .safetensors file path works as well as its folder.
    assert read_checkpoint(out / "model.safetensors")[1] == config
    # Weights are as readable as any file the user writes (safetensors alone makes them owner-only).
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert (out / "model.safetensors").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(MissingWeightsError, match=r"config\.json"):
        (tmp_path / "half").mkdir()
        (tmp_path / "half" / "model.safetensors").write_bytes(b"")
        read_checkpoint(tmp_path / "half")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"not safetensors")
    (tmp_path / "bad" / "config.json").write_text(json.dumps({}))
    with pytest.raises(BadDataError):
        read_checkpoint(tmp_path / "bad")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError):
        save_checkpoint(torch.nn.Linear(2, 2), blocker / "sub", {})


class Exploit:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_torch_load_never_runs_pickled_code(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    good = tmp_path / "good.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, good)
    assert torch.equal(torch_load_safely(good)["state_dict"]["w"], torch.ones(2))
    evil = tmp_path / "evil.pt"
    with evil.open("wb") as f:
        pickle.dump({"payload": Exploit()}, f)
    with pytest.raises(BadDataError):
        torch_load_safely(evil)
    assert "pickled code ran" not in capsys.readouterr().out
    with pytest.raises(MissingWeightsError):
        torch_load_safely(tmp_path / "absent.pt")
