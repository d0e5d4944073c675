"""The README stays true: its Python examples run and its Quickstart job works as written."""

from __future__ import annotations

import re
import shlex
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
    job = shlex.split(quickstart_commands()[0].split(" && ", 1)[1])
    assert job[0] == "langseg"
    result = subprocess.run(
        [sys.executable, "-m", "langseg", *job[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "shapes_demo" / "world.json").is_file()


def test_python_examples_run(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
