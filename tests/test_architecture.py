"""The layers of docs/architecture.md, checked on the source: who may import whom, and no circles.

Every ``import`` and ``from ... import`` in every file under ``src/langseg`` is read with ``ast`` (those
inside functions and ``TYPE_CHECKING`` blocks too: a lazy import is still a dependency), mapped to the
langseg package it names, and checked against the layer table below.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "langseg"

# Package (a subpackage or a top-level module of langseg) -> layer. A package may import only packages
# of a strictly lower layer (and itself), so no two packages can import each other.
LAYERS: dict[str, int] = {
    "errors": 0,
    "models": 1,
    "registry": 1,
    "metrics": 1,
    "viz": 1,
    "atomic": 1,
    "distributed": 1,
    "yamlio": 1,
    "hub": 2,
    "data": 2,
    "predict": 2,
    "convert": 3,
    "zoo": 4,
    "api": 5,
    "evaluate": 5,
    "train": 6,
    "batch": 6,
    "__init__": 7,  # the package root: lazy re-exports of api and predict
    "cli": 8,
    "__main__": 9,
    "serve": 7,  # the demo and the HTTP API: over api, predict and batch; the CLI starts them
    "export": 4,  # ONNX graphs and the onnxruntime predictor: over models and predict; api loads them
}
# What models/ may import besides the standard library and itself.
MODELS_THIRD_PARTY = {"torch", "timm", "open_clip"}


def package_of(path: Path) -> str:
    """``src/langseg/predict/segmenter.py`` -> ``predict``; ``src/langseg/hub.py`` -> ``hub``."""
    parts = path.relative_to(SRC).with_suffix("").parts
    return parts[0]


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import in ``path``; ``from a import b`` gives ``a.b``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    # The package holding the module (for relative imports): the folder, for __init__.py and the rest.
    module_parts = ("langseg", *path.relative_to(SRC).with_suffix("").parts)[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module_parts[: len(module_parts) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def target_package(name: str) -> str | None:
    """The langseg package a dotted import name lands in (``None`` outside langseg)."""
    parts = name.split(".")
    if parts[0] != "langseg":
        return None
    if len(parts) == 1:
        return "__init__"
    head = parts[1]
    if (SRC / head).is_dir() or (SRC / f"{head}.py").is_file():
        return head
    return "__init__"  # ``from langseg import __version__`` and the like


def source_files() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_every_package_has_a_layer() -> None:
    missing = {package_of(p) for p in source_files()} - set(LAYERS)
    assert not missing, f"add these packages to LAYERS and docs/architecture.md: {sorted(missing)}"


def test_imports_only_go_down_the_layers() -> None:
    wrong = []
    for path in source_files():
        source = package_of(path)
        for line, name in imported_modules(path):
            target = target_package(name)
            if target is None or target == source:
                continue
            if LAYERS[target] >= LAYERS[source]:
                wrong.append(f"{path.relative_to(SRC)}:{line} ({source}) imports {name} ({target})")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_models_import_networks_only() -> None:
    """models/ imports torch, timm, open_clip, the standard library and langseg.errors, nothing else."""
    allowed = MODELS_THIRD_PARTY | set(sys.stdlib_module_names) | {"__future__"}
    wrong = []
    for path in sorted((SRC / "models").rglob("*.py")):
        for line, name in imported_modules(path):
            top = name.split(".")[0]
            inside = name.startswith(("langseg.models", "langseg.errors"))
            if (top == "langseg" and not inside) or (top != "langseg" and top not in allowed):
                wrong.append(f"models/{path.relative_to(SRC / 'models')}:{line} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_no_import_circle_between_packages() -> None:
    """A depth-first search over the package graph finds no cycle (the layer test implies it; this one
    names the cycle if the table is ever loosened)."""
    graph: dict[str, set[str]] = {}
    for path in source_files():
        source = package_of(path)
        for _, name in imported_modules(path):
            target = target_package(name)
            if target is not None and target != source:
                graph.setdefault(source, set()).add(target)
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                pytest.fail("import circle: " + " -> ".join([*trail[trail.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The parser resolves absolute, relative and lazy imports (else the tests above could pass vacuously)."""
    module = SRC / "models" / "lseg.py"
    names = {name for _, name in imported_modules(module)}
    assert "langseg.errors.BadConfigError" in names and "torch" in names
    assert target_package("langseg.predict.segmenter.Segmenter") == "predict"
    assert target_package("langseg.__version__") == "__init__"
    zoo = {target_package(name) for _, name in imported_modules(SRC / "zoo" / "lseg.py")}
    assert {"hub", "models", "predict", "registry", "convert"} <= zoo  # convert is imported lazily


@pytest.mark.parametrize(
    "code",
    [
        "import langseg",
        "import langseg.cli",
        "from langseg.cli import app; from typer.main import get_command; get_command(app)",
    ],
)
def test_import_langseg_and_the_cli_do_not_import_torch(code: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}; import sys; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    "args", [["--help"], ["segment", "--help"], ["refer", "--help"], ["eval", "--help"], ["data", "shapes"]]
)
def test_cli_help_and_argument_errors_do_not_import_torch(args: list[str]) -> None:
    """``langseg --help``, a command's help and a missing argument answer without loading torch."""
    code = (
        "import sys\nfrom langseg.cli import app\n"
        f"try:\n    app({args!r}, standalone_mode=False)\nexcept BaseException:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_training_finds_the_registered_models_in_a_fresh_process() -> None:
    """``langseg train`` looks models up in the registry: importing the training package fills it."""
    code = (
        "import langseg.train\nfrom langseg.registry import get_model_entry\n"
        "print(get_model_entry('vlt-tiny').family)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "vlt"
