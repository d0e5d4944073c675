"""The README stays true: its Python examples run and its Quickstart job works as written."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def quickstart_commands() -> list[str]:
    block = re.search(r"## Quickstart\s+```bash\n(.*?)```", README, re.S)
    assert block, "README has no Quickstart bash block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_quickstart_has_exactly_two_commands_install_then_run() -> None:
    commands = quickstart_commands()
    assert len(commands) == 2
    assert all(c.startswith("pip install -e ") and " && " in c for c in commands)
    assert commands[1].split(" && ", 1)[1].strip() == "pytest"


def test_quickstart_main_job_runs(tmp_path: Path) -> None:
    """The Quickstart's jobs (segment, then refer) on a copy of examples/, with the shipped models."""
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    jobs = quickstart_commands()[0].split(" && ")[1:]
    assert [shlex.split(job)[:2] for job in jobs] == [["langseg", "segment"], ["langseg", "refer"]]
    for job in jobs:
        args = shlex.split(job)[1:]
        result = subprocess.run(
            [sys.executable, "-m", "langseg", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
    for stem in ("plain", "noise", "texture"):
        record = json.loads((tmp_path / "out" / "segment" / f"{stem}.json").read_text())
        assert record["model"] == "lseg-shapes" and len(record["labels"]) == 41
        assert (tmp_path / "out" / "segment" / f"{stem}.overlay.png").is_file()
    refer = json.loads((tmp_path / "out" / "refer" / "plain.json").read_text())
    assert [e["text"] for e in refer["expressions"]] == [
        "the white star",
        "the small triangle",
        "the yellow hexagon",
    ]


def test_python_examples_run(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
