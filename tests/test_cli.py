"""The CLI: commands work, and bad input gives a message and a hint, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

import langseg
import langseg.cli
from langseg.cli import main


def run_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str
) -> tuple[int, str, str]:
    """Run ``langseg ARGS`` in-process through the real entry point; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["langseg", *args])
    monkeypatch.setenv("COLUMNS", "200")
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_version_and_models(monkeypatch, capsys) -> None:
    code, out, _ = run_cli(monkeypatch, capsys, "version")
    assert code == 0 and f"langseg {langseg.__version__}" in out and "torch" in out
    code, out, _ = run_cli(monkeypatch, capsys, "models")
    assert code == 0
    names = langseg.list_models()
    assert all(name in out for name in names) if names else "No models registered" in out


def test_models_says_where_weights_come_from_and_fits_80_columns(monkeypatch, capsys) -> None:
    from langseg.hub import weights_available
    from langseg.registry import model_entries

    words = {
        "bundled": "bundled with langseg",
        "open_clip": "open_clip download",
        "convert": "convert official ckpt",
        None: "none",
    }
    for width in (80, 160):
        monkeypatch.setattr(langseg.cli, "console", Console(width=width, force_terminal=False))
        code, out, _ = run_cli(monkeypatch, capsys, "models")
        assert code == 0 and max(len(line) for line in out.splitlines()) <= width
        rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") >= 5}
        for entry in model_entries():
            row = rows[entry.name].split("│")
            kind = entry.weights.kind if entry.weights is not None else None
            assert row[3].strip().startswith(words[kind]), row
            assert row[4].strip() == ("yes" if weights_available(entry.weights, entry.name) else "no")
        assert ("┃ description" in out) == (width >= 120)
    assert rows["vlt-shapes"].split("│")[4].strip() == "yes"  # bundled, so here on every machine


def test_data_shapes_writes_the_documented_layout(monkeypatch, capsys, tmp_path: Path) -> None:
    out_dir = tmp_path / "world"
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        "data",
        "shapes",
        "--out",
        str(out_dir),
        "--num",
        "3",
        "--seed",
        "4",
        "--size",
        "64",
    )
    assert code == 0, err
    world = json.loads((out_dir / "world.json").read_text())
    assert world["seed"] == 4 and world["num_scenes"] == 3 and world["config"]["size"] == 64
    for sub, ext in (("images", "png"), ("instances", "png"), ("semantic", "png"), ("annotations", "json")):
        assert sorted(p.name for p in (out_dir / sub).iterdir()) == [f"00000{i}.{ext}" for i in range(3)]


EVAL_VLT = ["eval", "vlt-shapes", "--data", "shapeworld-referring", "--data-arg", "num_scenes=1"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["data", "shapes", "--out", "{tmp}/a", "--num", "-1"], "--num"),
        (["data", "shapes", "--out", "{tmp}/a", "--frobnicate"], "No such option"),
        (["data", "shapes", "--out", "{tmp}/file.txt/sub", "--num", "1"], "cannot write"),
        (["data", "shapes", "--out", "{tmp}/busy", "--num", "1"], "not empty"),
        (["data", "shapes", "--out", "{tmp}/a", "--background", "fuzzy"], "unknown background"),
        (["data", "shapes", "--out", "{tmp}/a", "--min-objects", "5", "--max-objects", "2"], "min_objects"),
        (["data", "shapes", "--out", "{tmp}/a", "--granularity", "texture"], "granularity"),
        (["no-such-command"], "No such command"),
        (
            [*EVAL_VLT, "--plan", "paper"],
            "take no option 'plan'",
        ),
        (
            [*EVAL_VLT, "--upsample", "nearest"],
            "unknown upsample",
        ),
    ],
)
def test_bad_input_is_a_message_not_a_traceback(monkeypatch, capsys, tmp_path: Path, args, expected) -> None:
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("keep")
    code, out, err = run_cli(monkeypatch, capsys, *(a.format(tmp=tmp_path) for a in args))
    assert code == 2
    assert expected in out + err
    assert "Traceback" not in out + err
    assert (tmp_path / "busy" / "keep.txt").read_text() == "keep"


def test_installed_script_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "langseg", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "data" in result.stdout and "models" in result.stdout


def test_labels_from_a_file(tmp_path: Path, monkeypatch, capsys) -> None:
    from langseg.cli import read_labels

    (tmp_path / "labels.txt").write_text("red circle\n\nblue square, green star\n  background  \n")
    assert read_labels(f"@{tmp_path / 'labels.txt'}") == [
        "red circle",
        "blue square",
        "green star",
        "background",
    ]
    assert read_labels("a, b") == ["a", "b"]
    code, _, err = run_cli(
        monkeypatch, capsys, "segment", str(tmp_path), "--labels", f"@{tmp_path / 'no.txt'}"
    )
    assert code == 2 and "cannot read labels" in err and "hint:" in err and "Traceback" not in err
