"""Robustness of the ``langseg`` command line (issue 13): every argument vector ends in exit status 0 or
2 (1: some images of a batch failed) with one message and no traceback, nothing that exists is
overwritten without ``--overwrite``, conflicting outputs are refused before any work, and outputs are
written atomically (a failing command leaves no partial output and no temporary file).

The generated vectors start from a valid command line in a small sandbox folder and break at least one
argument, so that each is refused before a model loads (loading fails the test); the sandbox's files
and their times are compared before and after each case.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import langseg
import langseg.api
from langseg.batch import TEMP_PREFIX, write_folder_atomic
from langseg.data import ShapeWorldConfig, render_scene
from langseg.data.shapes_datasets import ShapeWorldFolder, write_shapeworld
from langseg.errors import OutputError
from tests.robust import ROBUST, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")
# The devices that are not here (its "CPU" is the CPU: langseg.api.resolve_device ignores case).
# "cuda" and "mps" only where this machine lacks them.
HOSTILE = [
    *(["cuda"] if not torch.cuda.is_available() else []),
    "cuda:99",
    *(["mps"] if not torch.backends.mps.is_available() else []),
    "bogus",
    "",
    "meta",
]


# ------------------------------------------------------------------------------------------ sandbox


def make_sandbox(root: Path) -> Path:
    """A folder with inputs and existing outputs that the generated command lines point at."""
    root.mkdir()
    image = render_scene(3, 0, ShapeWorldConfig(size=32)).image
    Image.fromarray(image).save(root / "img.png")
    (root / "imgs").mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(image).save(root / "imgs" / name)
    (root / "empty_dir").mkdir()
    (root / "file.txt").write_text("not a folder\n")
    (root / "notes").mkdir()
    (root / "notes" / "keep.txt").write_text("precious\n")
    (root / "scores.json").write_text('{"old": 1}\n')
    (root / "done").mkdir()
    for suffix in (".overlay.png", ".mask.png", ".json"):
        (root / "done" / f"img{suffix}").write_bytes(b"old output")
    (root / "model").mkdir()
    for name in ("model.safetensors", "config.json"):
        (root / "model" / name).write_bytes(b"old model")
    (root / "recipe.yaml").write_text("task: toy-semantic\nmax_steps: 1\n")
    (root / "binary.yaml").write_bytes(bytes(range(256)))
    (root / "empty.ckpt").write_bytes(b"")
    (root / "labels.txt").write_text("red circle\nother\n")
    write_shapeworld(root / "world", 1, config=ShapeWorldConfig(size=32))
    return root


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_sandbox(tmp_path_factory.mktemp("template") / "sandbox")


def snapshot(root: Path) -> dict[str, tuple]:
    """Relative path -> (kind, size, mtime) of everything under ``root``."""
    found = {}
    for path in root.rglob("*"):
        # A folder's time changes when a temporary entry comes and goes: only its existence counts.
        info = path.lstat()
        entry = ("dir", 0, 0) if path.is_dir() else ("file", info.st_size, info.st_mtime_ns)
        found[str(path.relative_to(root))] = entry
    return found


def changed(before: dict, after: dict) -> set[str]:
    return {key for key in before.keys() | after.keys() if before.get(key) != after.get(key)}


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model fails the test: every generated case must be refused before that."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a model was loaded for a command that should have been refused: {args}")

    monkeypatch.setattr(langseg.api, "load", refuse)


# ------------------------------------------------------------------------------ generated vectors

# Junk where a path goes: numbers, unicode, too long, under a file, in places nobody can write.
JUNK_PATHS = st.one_of(
    st.sampled_from(
        ["", " ", "missing.png", "file.txt/sub", "a" * 300, "/proc/langseg/x", "3", "-1", "1e400", "nan"]
    ),
    st.text(
        alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/*?[]"),
        min_size=1,
        max_size=12,
    ).map(lambda text: f"missing-{text}"),
)
JUNK_TEXT = st.one_of(
    st.sampled_from(["", " ", "-", "--", "=", "@", "\t", "é", "∞", "nan", "-1", "1e400", "x" * 500]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=15),
)
# Never a valid count: no big integers (a valid --limit), no "٣" (Python's int() reads it as 3).
JUNK_NUMBERS = st.sampled_from(["", "x", "-1", "0", "1.5", "1e400", "nan", "-inf", "0x10", "三"])

# Per command: a valid command line (as (option, value) slots; None = a positional argument), and for
# each slot the values that are wrong. Each case breaks at least one slot.
BAD_OUTPUTS_BATCH = ["file.txt", "file.txt/sub", "done", "a" * 300, "", "img.png"]
COMMANDS: dict[str, tuple[list[str], list[tuple[str | None, str, st.SearchStrategy]]]] = {
    "segment": (
        ["segment"],
        [
            (None, "img.png", st.one_of(JUNK_PATHS, st.sampled_from(["empty_dir", "*.gif", "notes"]))),
            ("--labels", "red circle, other", st.one_of(JUNK_TEXT, st.sampled_from(["a", "a,,b", "@nope"]))),
            ("--model", "lseg-shapes", st.one_of(JUNK_TEXT, JUNK_PATHS, st.just("vlt-shapes"))),
            ("--out", "new_out", st.sampled_from(BAD_OUTPUTS_BATCH)),
            ("--device", "cpu", st.one_of(st.sampled_from(HOSTILE), JUNK_TEXT)),
            ("--dtype", "float32", JUNK_TEXT),
            ("--format", "both", JUNK_TEXT),
            ("--background-threshold", "0.5", JUNK_NUMBERS),
            ("--weights", "model/model.safetensors", JUNK_PATHS),
        ],
    ),
    "refer": (
        ["refer"],
        [
            (None, "imgs", st.one_of(JUNK_PATHS, st.sampled_from(["empty_dir", "imgs/*.jpg"]))),
            ("--text", "the red circle", st.sampled_from(["", " ", "42 !", "...", "\t"])),
            ("--model", "vlt-shapes", st.one_of(JUNK_TEXT, JUNK_PATHS, st.just("lseg-shapes"))),
            ("--out", "new_out", st.sampled_from(BAD_OUTPUTS_BATCH)),
            ("--device", "cpu", st.one_of(st.sampled_from(HOSTILE), JUNK_TEXT)),
            ("--format", "png", JUNK_TEXT),
        ],
    ),
    "eval": (
        ["eval"],
        [
            (None, "vlt-shapes", st.one_of(JUNK_PATHS, st.sampled_from(["no-such-model", "notes"]))),
            ("--data", "shapeworld-referring", st.one_of(JUNK_TEXT, st.just("no-such-data"))),
            ("--data-arg", "num_scenes=1", st.sampled_from(["", "=", "x", "num_scenes", "=1"])),
            ("--device", "cpu", st.one_of(st.sampled_from(HOSTILE), JUNK_TEXT)),
            ("--limit", "1", JUNK_NUMBERS),
            ("--out", "new.json", st.sampled_from(["notes", "file.txt/x.json", "", "a" * 300, "imgs/a.png"])),
            ("--upsample", "logits", st.sampled_from(["nearest", "bogus", ""])),
            ("--weights", "model/model.safetensors", st.sampled_from(["missing.safetensors", "", "a" * 300])),
        ],
    ),
    "data shapes": (
        ["data", "shapes"],
        [
            (
                "--out",
                "new_world",
                st.sampled_from(
                    ["notes", "file.txt", "file.txt/w", "world", "", "a" * 300, "/proc/langseg/w"]
                ),
            ),
            ("--num", "1", st.sampled_from(["-1", "x", "", "1.5", "1e400"])),
            ("--size", "32", st.sampled_from(["31", "0", "-32", "x", ""])),
            ("--seed", "0", st.sampled_from(["x", "", "1.5"])),
            ("--min-objects", "1", st.sampled_from(["0", "-1", "x", "9"])),
            ("--max-objects", "2", st.sampled_from(["0", "x", ""])),
            ("--background", "plain", st.one_of(JUNK_TEXT, st.just("fuzzy"))),
            ("--granularity", "shape", st.one_of(JUNK_TEXT, st.just("texture"))),
            ("--per-object", "1", st.sampled_from(["0", "-1", "x"])),
        ],
    ),
    "convert": (
        ["convert", "lseg-official"],
        [
            (None, "empty.ckpt", st.one_of(JUNK_PATHS, st.sampled_from(["notes", "img.png", "file.txt"]))),
            (
                None,
                "new_model",
                st.sampled_from(["model", "notes", "file.txt", "empty.ckpt", "file.txt/m", ""]),
            ),
            ("--variant", "lseg-tiny", st.one_of(JUNK_TEXT, st.just("lseg-vitl16-384"))),
            ("--arch-option", "0", JUNK_NUMBERS),
        ],
    ),
    "export": (
        ["export"],
        [
            (
                None,
                "recipe.yaml",
                st.one_of(JUNK_PATHS, st.sampled_from(["binary.yaml", "notes", "img.png"])),
            ),
            (
                None,
                "new_model",
                st.sampled_from(["model", "notes", "file.txt", "recipe.yaml", "file.txt/m", ""]),
            ),
            ("--checkpoint", "empty.ckpt", st.one_of(JUNK_PATHS, st.sampled_from(["notes", "img.png"]))),
            ("--set", "max_steps=1", st.sampled_from(["", "=", "x", "max_steps", "max_steps=-1", "nope=1"])),
        ],
    ),
    "train": (
        ["train"],
        [
            (
                None,
                "recipe.yaml",
                st.one_of(JUNK_PATHS, st.sampled_from(["binary.yaml", "notes", "img.png"])),
            ),
            ("--resume", "missing.ckpt", st.one_of(JUNK_PATHS, st.sampled_from(["empty.ckpt", "notes"]))),
        ],
    ),
    "models": (["models"], [("--task", "semantic", JUNK_TEXT)]),
}
# Export's and convert's valid checkpoint is an empty file, and train's recipe never trains (its
# resume checkpoint is broken in every case): they end in a clean error even when nothing else is wrong.


# Extra arguments: a flag that exists (valid with some outputs), one that does not, a dangling --out,
# an extra positional. No --overwrite for segment, refer and eval: it would make their existing-output
# slots valid, and a fully valid command line would load a model.
EXTRAS = [["--overwrite"], ["--bogus-flag"], ["--out"], ["extra"], []]
EXTRAS_NO_OVERWRITE = EXTRAS[1:]


@st.composite
def argument_vectors(draw: st.DrawFn, name: str) -> tuple[list[str], list[str]]:
    """(command line, the outputs it names) of command ``name`` with one to three broken (or missing)
    arguments, the rest valid."""
    prefix, slots = COMMANDS[name]
    broken = set(draw(st.lists(st.integers(0, len(slots) - 1), min_size=1, max_size=3)))
    options, positional, outputs = [], [], []
    for index, (option, valid, bad) in enumerate(slots):
        value = draw(bad) if index in broken else valid
        if option is None and index in broken and draw(st.integers(0, 9)) == 0:
            continue  # dropped: a missing required argument
        if option is None:
            positional.append(value)
        else:
            options += [option, value]
        if option == "--out" or (name in ("convert", "export") and option is None and index == 1):
            outputs.append(value)
    if draw(st.integers(0, 3)) == 0:  # rarely: most cases should get past typer's own parsing
        writers = ("data shapes", "convert", "export")
        options += draw(st.sampled_from(EXTRAS if name in writers else EXTRAS_NO_OVERWRITE))
    argv = prefix + (options + positional if draw(st.booleans()) else positional + options)
    return argv, outputs


@settings(parent=ROBUST, max_examples=20)
@pytest.mark.parametrize("name", sorted(COMMANDS))
@given(data=st.data())
def test_generated_argument_vectors_fail_clean(
    name, data, template, tmp_path, monkeypatch, capsys, no_loading
) -> None:
    """Broken command lines of every command: exit 2 (or 0 where the breakage is legal: help, an
    overwrite) with one message, and no file of the sandbox changed but the command's own outputs."""
    argv, outputs = data.draw(argument_vectors(name), label="argv")
    sandbox = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
    shutil.copytree(template, sandbox)
    monkeypatch.chdir(sandbox)
    before = snapshot(sandbox)
    code, out, err = run_cli("cli", monkeypatch, capsys, *argv)
    assert code in (0, 2), f"exit {code} for {argv}:\n{out}{err}"
    if code == 2:
        assert "error" in err.lower(), err  # ours ("error: ... hint: ...") or a usage error from typer
        assert "hint:" in err or "error:" not in err, err
    after = snapshot(sandbox)
    assert not [key for key in after if TEMP_PREFIX in key], "temporary files left behind"
    owned = [(sandbox / out).resolve() for out in outputs if out.strip()]
    for key in changed(before, after):
        path = (sandbox / key).resolve()
        mine = any(path == o or o in path.parents or path in o.parents for o in owned)
        assert code == 0 and mine, f"{argv} changed {key} (exit {code}):\n{err}"


# --------------------------------------------------------------------------------------- devices


def scene_file(folder: Path, name: str = "img.png") -> Path:
    Image.fromarray(render_scene(3, 0, ShapeWorldConfig(size=32)).image).save(folder / name)
    return folder / name


@pytest.mark.parametrize("device", HOSTILE)
@pytest.mark.parametrize(
    "command",
    [
        ["segment", "{img}", "--labels", "red circle, other", "--model", "lseg-shapes"],
        ["refer", "{img}", "--text", "the red circle"],
        ["eval", "vlt-shapes", "--data", "shapeworld-referring", "--data-arg", "num_scenes=1"],
    ],
)
def test_devices_that_are_not_here_are_refused_before_loading(
    command, device, tmp_path, monkeypatch, capsys, no_loading
) -> None:
    img = scene_file(tmp_path)
    monkeypatch.chdir(tmp_path)
    argv = [a.format(img=img) for a in command] + ["--device", device]
    code, _, err = run_cli("cli", monkeypatch, capsys, *argv)
    assert code == 2 and "device" in err and "hint:" in err and "cpu" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png"]  # nothing written


# ---------------------------------------------------------------------------------------- export


@pytest.fixture
def fake_export(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """``export_checkpoint`` writing a model folder without a trained checkpoint; records its folders.
    With ``fail`` in the list it raises after writing the weights (an interrupted export)."""
    calls: list = []

    def export(config, checkpoint, out_dir):
        out = Path(out_dir)
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"new weights")
        if "fail" in calls:
            raise KeyboardInterrupt
        (out / "config.json").write_text('{"new": true}')
        calls.append(out)
        return out

    import langseg.train.export

    monkeypatch.setattr(langseg.train.export, "export_checkpoint", export)
    return calls


def recipe(folder: Path) -> Path:
    (folder / "recipe.yaml").write_text(f"task: toy-semantic\nout_dir: {folder / 'run'}\n")
    return folder / "recipe.yaml"


def test_export_refuses_an_existing_model_without_overwrite(tmp_path, monkeypatch, capsys, fake_export):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("old")
    code, _, err = run_cli("cli", monkeypatch, capsys, "export", str(recipe(tmp_path)), str(model))
    assert code == 2 and "not empty" in err and "--overwrite" in err
    assert fake_export == [] and (model / "config.json").read_text() == "old"
    code, _, err = run_cli(
        "cli", monkeypatch, capsys, "export", str(recipe(tmp_path)), str(model), "--overwrite"
    )
    assert code == 0, err
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]
    assert (model / "config.json").read_text() == '{"new": true}'
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)]


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("notes", "does not write there"),  # --overwrite never deletes what langseg did not write
        ("recipe.yaml", "not a folder"),  # the input recipe
        ("recipe.yaml/sub", "is a file"),
        ("run", "holds the input"),  # the run folder "auto" reads the checkpoint from
    ],
)
def test_export_refuses_conflicting_folders(out, message, tmp_path, monkeypatch, capsys, fake_export):
    path = recipe(tmp_path)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("keep")
    (tmp_path / "run").mkdir()
    before = snapshot(tmp_path)
    code, _, err = run_cli(
        "cli", monkeypatch, capsys, "export", str(path), str(tmp_path / out), "--overwrite"
    )
    assert code == 2 and message in err, err
    assert fake_export == [] and snapshot(tmp_path) == before


def test_an_interrupted_export_leaves_the_old_model(tmp_path, monkeypatch, capsys, fake_export):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"old weights")
    (model / "config.json").write_text("old")
    fake_export.append("fail")
    # typer turns the interrupt into "Aborted" and exit status 130 (128 + SIGINT)
    argv = ["export", str(recipe(tmp_path)), str(model), "--overwrite"]
    assert run_cli("cli", monkeypatch, capsys, *argv)[0] == 130
    assert (model / "model.safetensors").read_bytes() == b"old weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "recipe.yaml"]  # no temporary folder


def test_export_into_a_new_folder_is_atomic(tmp_path, monkeypatch, capsys, fake_export):
    fake_export.append("fail")
    # typer turns the interrupt into "Aborted" and exit status 130 (128 + SIGINT)
    argv = ["export", str(recipe(tmp_path)), str(tmp_path / "new" / "m")]
    assert run_cli("cli", monkeypatch, capsys, *argv)[0] == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]  # not even the parent "new"


# ------------------------------------------------------------------------------------------- eval


@pytest.fixture
def fake_eval(monkeypatch: pytest.MonkeyPatch) -> dict:
    """``langseg eval`` without a model run: ``langseg.load`` and ``evaluate`` stand-ins; the scores the
    command gets are ``scores["value"]`` (NaN and infinities included), and ``scores["runs"]`` counts."""
    import langseg.evaluate

    state: dict = {"runs": 0, "value": {"oIoU": 0.5, "mIoU": math.nan, "Pr@0.9": math.inf, "count": 3.0}}

    def evaluate(predictor, dataset, limit=None, progress=True):
        state["runs"] += 1
        return state["value"]

    monkeypatch.setattr(langseg, "load", lambda *args, **kwargs: object())
    monkeypatch.setattr(langseg.evaluate, "evaluate", evaluate)
    return state


EVAL = ["eval", "vlt-shapes", "--data", "shapeworld-referring", "--data-arg", "num_scenes=1"]


def test_eval_out_is_valid_json_with_null_for_nan(tmp_path, monkeypatch, capsys, fake_eval):
    out = tmp_path / "sub" / "scores.json"
    code, _, err = run_cli("cli", monkeypatch, capsys, *EVAL, "--out", str(out))
    assert code == 0, err
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    scores = json.loads(text, parse_constant=lambda token: pytest.fail(f"bare {token} in JSON"))
    assert scores == {"oIoU": 0.5, "mIoU": None, "Pr@0.9": None, "count": 3.0}
    assert sorted(p.name for p in out.parent.iterdir()) == ["scores.json"]


def test_eval_refuses_an_existing_out_without_overwrite_before_any_work(
    tmp_path, monkeypatch, capsys, fake_eval
):
    out = tmp_path / "scores.json"
    out.write_text("old")
    code, _, err = run_cli("cli", monkeypatch, capsys, *EVAL, "--out", str(out))
    assert code == 2 and "exists already" in err and "--overwrite" in err
    assert fake_eval["runs"] == 0 and out.read_text() == "old"
    code, _, err = run_cli("cli", monkeypatch, capsys, *EVAL, "--out", str(out), "--overwrite")
    assert code == 0 and json.loads(out.read_text())["oIoU"] == 0.5


@pytest.mark.parametrize(
    ("out", "extra", "message"),
    [
        ("folder", [], "is a folder"),
        ("file.txt/scores.json", [], "is a file"),
        ("w.safetensors", ["--weights", "{tmp}/w.safetensors", "--overwrite"], "also an input"),
        ("data/scores.json", ["--root", "{tmp}/data"], "inside the dataset root"),
        ("a" * 300, [], "cannot use the path"),
    ],
)
def test_eval_refuses_conflicting_outputs(out, extra, message, tmp_path, monkeypatch, capsys, fake_eval):
    (tmp_path / "folder").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "w.safetensors").write_bytes(b"weights")
    before = snapshot(tmp_path)
    argv = [*EVAL, "--out", str(tmp_path / out), *(a.format(tmp=tmp_path) for a in extra)]
    code, _, err = run_cli("cli", monkeypatch, capsys, *argv)
    assert code == 2 and message in err, err
    assert fake_eval["runs"] == 0 and snapshot(tmp_path) == before


def test_eval_out_never_replaces_the_model_it_reads(tmp_path, monkeypatch, capsys, fake_eval):
    model = tmp_path / "vlt"
    shutil.copytree(Path(langseg.__file__).parent / "weights" / "vlt-shapes", model)
    before = snapshot(tmp_path)
    for name in ("config.json", "model.safetensors"):
        argv = ["eval", str(model), *EVAL[2:], "--out", str(model / name), "--overwrite"]
        code, _, err = run_cli("cli", monkeypatch, capsys, *argv)
        assert code == 2 and "also an input" in err, err
    assert fake_eval["runs"] == 0 and snapshot(tmp_path) == before


def test_a_failing_eval_write_keeps_the_old_file(tmp_path, monkeypatch, capsys, fake_eval):
    out = tmp_path / "scores.json"
    out.write_text("old")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    code, _, err = run_cli("cli", monkeypatch, capsys, *EVAL, "--out", str(out), "--overwrite")
    assert code == 2 and "No space left" in err
    assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["scores.json"]


# ------------------------------------------------------------------------------------ data shapes


def shapes(out: Path, num: int, *extra: str) -> list[str]:
    return ["data", "shapes", "--out", str(out), "--num", str(num), "--size", "32", *extra]


def test_shapes_overwrite_with_fewer_scenes_leaves_no_old_scene(tmp_path, monkeypatch, capsys):
    world = tmp_path / "world"
    code, _, err = run_cli("cli", monkeypatch, capsys, *shapes(world, 3))
    assert code == 0, err
    code, _, err = run_cli("cli", monkeypatch, capsys, *shapes(world, 3, "--seed", "1"))
    assert code == 2 and "not empty" in err and "--overwrite" in err
    code, _, err = run_cli("cli", monkeypatch, capsys, *shapes(world, 1, "--seed", "1", "--overwrite"))
    assert code == 0, err
    for sub in ("images", "instances", "semantic", "annotations"):
        assert [p.stem for p in (world / sub).iterdir()] == ["000000"]
    assert len(ShapeWorldFolder(world)) == 1 and json.loads((world / "world.json").read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"]


def test_shapes_killed_midway_keeps_the_old_world_whole(tmp_path, monkeypatch, capsys):
    world = tmp_path / "world"
    write_shapeworld(world, 3, seed=0, config=ShapeWorldConfig(size=32))
    before = {p.relative_to(world): p.read_bytes() for p in world.rglob("*") if p.is_file()}
    import langseg.data.shapes_datasets as shapes_datasets

    render, calls = shapes_datasets.render_scene, []

    def killed(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return render(*args, **kwargs)

    monkeypatch.setattr(shapes_datasets, "render_scene", killed)
    # typer turns the interrupt into "Aborted" and exit status 130 (128 + SIGINT)
    assert run_cli("cli", monkeypatch, capsys, *shapes(world, 2, "--seed", "7", "--overwrite"))[0] == 130
    assert {p.relative_to(world): p.read_bytes() for p in world.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"]  # no temporary folder left
    assert len(ShapeWorldFolder(world)) == 3


@pytest.mark.parametrize(
    ("out", "message"),
    [("notes", "not part of a ShapeWorld"), ("file.txt", "not a folder"), ("file.txt/w", "is a file")],
)
def test_shapes_overwrite_never_replaces_other_files(out, message, tmp_path, monkeypatch, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("keep")
    (tmp_path / "file.txt").write_text("x")
    before = snapshot(tmp_path)
    code, _, err = run_cli("cli", monkeypatch, capsys, *shapes(tmp_path / out, 1, "--overwrite"))
    assert code == 2 and message in err, err
    assert snapshot(tmp_path) == before


def test_shapes_into_an_empty_folder_keeps_the_folder(tmp_path, monkeypatch, capsys):
    world = tmp_path / "world"
    world.mkdir()
    inode = world.stat().st_ino
    code, _, err = run_cli("cli", monkeypatch, capsys, *shapes(world, 1))
    assert code == 0, err
    assert world.stat().st_ino == inode and len(ShapeWorldFolder(world)) == 1


# ---------------------------------------------------------------------------- convert, segment, refer


def test_convert_refuses_a_folder_holding_its_checkpoint(tmp_path, monkeypatch, capsys):
    (tmp_path / "demo.ckpt").write_bytes(b"")
    for args in ([str(tmp_path)], [str(tmp_path), "--overwrite"], [str(tmp_path / "demo.ckpt")]):
        before = snapshot(tmp_path)
        code, _, err = run_cli(
            "cli", monkeypatch, capsys, "convert", "lseg-official", str(tmp_path / "demo.ckpt"), *args
        )
        assert code == 2 and "error:" in err and snapshot(tmp_path) == before, err


def test_a_failing_convert_overwrite_keeps_the_old_model(tmp_path, monkeypatch, capsys):
    from tests.test_lseg_convert import TINY, _write_ckpt

    _write_ckpt(tmp_path / "a.ckpt", TINY, seed=1)
    _write_ckpt(tmp_path / "b.ckpt", TINY, seed=2)
    out = tmp_path / "model"
    convert = ["convert", "lseg-official", "--variant", "lseg-tiny"]
    assert run_cli("cli", monkeypatch, capsys, *convert, str(tmp_path / "a.ckpt"), str(out))[0] == 0
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    # These keys do not fit arch option 1: the conversion fails after it started.
    argv = [*convert, str(tmp_path / "b.ckpt"), str(out), "--overwrite", "--arch-option", "1"]
    code, _, err = run_cli("cli", monkeypatch, capsys, *argv)
    assert code == 2 and "error:" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt", "b.ckpt", "model"]
    code, _, err = run_cli(
        "cli", monkeypatch, capsys, *convert, str(tmp_path / "b.ckpt"), str(out), "--overwrite"
    )
    assert code == 0, err
    new = {p.name: p.read_bytes() for p in out.iterdir()}
    assert new.keys() == old.keys() and new["model.safetensors"] != old["model.safetensors"]


def test_batch_outputs_that_are_inputs_or_folders_are_refused(tmp_path, monkeypatch, capsys, no_loading):
    out = tmp_path / "out"
    out.mkdir()
    scene_file(out, "a.png")
    scene_file(out, "a.mask.png")  # an input that a.png's mask output would replace
    (out / "b.json").mkdir()  # a folder where b.png's JSON goes
    scene_file(tmp_path, "b.png")
    monkeypatch.chdir(tmp_path)
    base = ["refer", "--text", "the red circle", "--out", str(out), "--overwrite"]
    for images, message in (
        ([str(out / "a.png"), str(out / "a.mask.png")], "also an input"),
        ([str(tmp_path / "b.png")], "not a file"),
    ):
        before = snapshot(tmp_path)
        code, _, err = run_cli("cli", monkeypatch, capsys, *base, *images)
        assert code == 2 and message in err and snapshot(tmp_path) == before, err


@pytest.mark.parametrize("argv", [["models", "--task", "bogus"], ["segment", "", "--labels", "a, b"]])
def test_empty_and_unknown_values_are_refused(argv, tmp_path, monkeypatch, capsys, no_loading):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli("cli", monkeypatch, capsys, *argv)
    assert code == 2 and ("hint:" in err or "Invalid value" in err), err
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------- the folder writer


def test_write_folder_atomic_swaps_whole_folders(tmp_path) -> None:
    target = tmp_path / "m"

    def write(names):
        def go(folder: Path) -> None:
            folder.mkdir()
            for name in names:
                (folder / name).write_text(name)
                if name == "boom":
                    raise OSError(5, "Input/output error")

        return go

    write_folder_atomic(target, write(["a", "b"]))
    write_folder_atomic(target, write(["c"]))  # replaces: no old "a" or "b" left
    assert sorted(p.name for p in target.iterdir()) == ["c"]
    with pytest.raises(OutputError, match="Input/output error"):
        write_folder_atomic(target, write(["d", "boom"]))
    assert sorted(p.name for p in target.iterdir()) == ["c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert np.all([p.read_text() == p.name for p in target.iterdir()])
