"""The one safe YAML reader: config files, ``key=value`` overrides and ``--data-arg`` values.

YAML is user input, and plain ``yaml.safe_load`` is safe against code execution but not against
everything else a careless or hostile text can do. :func:`load_yaml` adds what it lacks:

- a size bound on the text (:data:`MAX_BYTES`), UTF-8 checked with the byte offset of the first bad byte;
- a bound on the *expanded* document: aliases (``*a``) make YAML a DAG, and a "billion laughs" document of
  a few hundred bytes names 10**9 values. The node graph is measured before anything is constructed
  (each node counted once per path that reaches it, memoised, so the count itself is linear in the
  graph), and documents beyond :data:`MAX_NODES` values, deeper than :data:`MAX_DEPTH`, or with a cycle
  (``&a [*a]``) are refused;
- every parse problem (syntax, ``!!python/object`` and other unknown tags, documents nested so deep that
  the parser recurses out, integers too long for Python to convert) as one
  :class:`~langseg.errors.BadConfigError` naming the source, with line and column where YAML knows them.

:func:`short_repr` is the bounded ``repr`` that messages about user values should use: it never expands a
shared or huge structure and is cut to about 80 characters.

This module imports no torch (layer 1; it may import only :mod:`langseg.errors`).
"""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any

import yaml

from langseg.errors import BadConfigError

__all__ = ["MAX_BYTES", "MAX_DEPTH", "MAX_NODES", "load_yaml", "read_yaml_file", "short_repr"]

MAX_BYTES = 4 * 1024 * 1024  # a training recipe is a few kilobytes
MAX_NODES = 100_000  # values in the document once every alias is expanded
MAX_DEPTH = 64  # nesting of mappings and sequences; recipes use 3 or 4
SHORT = 80  # characters of a user value shown in a message

_HINT = "Fix the YAML text; see configs/ for examples of valid recipes."

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxdict, _repr.maxlist, _repr.maxtuple = 3, 6, 6, 6
_repr.maxset, _repr.maxfrozenset, _repr.maxstring, _repr.maxother = 6, 6, SHORT, SHORT
_repr.maxlong = 40


def short_repr(value: Any, limit: int = SHORT) -> str:
    """``repr(value)`` bounded in time and length: nested and shared structures are elided (``...``),
    huge integers summarised, and the text cut to ``limit`` characters."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"<an integer of {value.bit_length()} bits>"
    try:
        text = _repr.repr(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_graph(root: yaml.Node, source: str) -> None:
    """Refuse a composed document that expands beyond :data:`MAX_NODES`, nests beyond
    :data:`MAX_DEPTH` or holds a cycle, without expanding it (iterative: no recursion limit)."""
    expanded: dict[int, int] = {}  # id(node) -> values under it, aliases expanded
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        if done:
            on_path.discard(key)
            expanded[key] = 1 + sum(expanded[id(c)] for c in children)
            depth[key] = 1 + max((depth[id(c)] for c in children), default=0)
            if expanded[key] > MAX_NODES:
                raise BadConfigError(
                    f"{source}: the YAML document expands to more than {MAX_NODES} values (aliases "
                    "repeated inside aliases); refused before expanding it",
                    hint="Write the values out; a config never needs nested aliases.",
                )
            if depth[key] > MAX_DEPTH:
                raise BadConfigError(
                    f"{source}: the YAML document is nested more than {MAX_DEPTH} levels deep",
                    hint=_HINT,
                )
            continue
        if key in expanded:
            continue
        if key in on_path:
            raise BadConfigError(
                f"{source}: the YAML document refers to itself through an alias (a cycle)", hint=_HINT
            )
        on_path.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in children if id(child) not in expanded)


class _BoundedLoader(yaml.SafeLoader):
    """``SafeLoader`` that checks the composed node graph (:func:`_check_graph`) before constructing."""

    source = "YAML"
    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        # PyYAML composes recursively: stop at MAX_DEPTH, long before Python's recursion limit.
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise BadConfigError(
                    f"{self.source}: the YAML document is nested more than {MAX_DEPTH} levels deep",
                    hint=_HINT,
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_document(self, node: yaml.Node) -> Any:
        _check_graph(node, self.source)
        return super().construct_document(node)


def _position(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _problem(err: yaml.YAMLError) -> str:
    """The problem in one bounded line, without the source snippet PyYAML appends to its message."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    if "could not determine a constructor for the tag" in problem:
        return "unsupported tag " + short_repr(problem.rsplit(" ", 1)[-1].strip("'"), 60)
    return short_repr(problem, 120).strip("'\"")


def load_yaml(text: str | bytes, source: str = "YAML") -> Any:
    """The plain data (dicts, lists, strings, numbers, booleans, None) of one YAML document.

    Args:
        text: the document (bytes are decoded as UTF-8).
        source: what the text is, for messages (a file path, ``override 'optim.lr=...'``).

    Raises:
        BadConfigError: too long, not UTF-8, binary, not valid YAML, an unsupported tag, too deep or
            expanding beyond the bounds above. The message never holds the (expanded) value itself.
    """
    if isinstance(text, bytes):
        if len(text) > MAX_BYTES:
            raise BadConfigError(f"{source} is {len(text)} bytes; YAML over {MAX_BYTES} bytes is refused")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            raise BadConfigError(
                f"{source} is not UTF-8 text (byte {err.start} is 0x{text[err.start]:02x}); a binary file?",
                hint="Pass a YAML text file saved as UTF-8.",
            ) from None
    if len(text) > MAX_BYTES:
        raise BadConfigError(f"{source} holds {len(text)} characters; YAML over {MAX_BYTES} is refused")
    if "\x00" in text:
        raise BadConfigError(f"{source} holds NUL bytes: a binary file, not YAML", hint=_HINT)
    loader = None
    try:
        loader = _BoundedLoader(text)  # the reader checks the characters here already
        loader.source = source
        return loader.get_single_data()
    except BadConfigError:
        raise
    except yaml.YAMLError as err:
        raise BadConfigError(
            f"{source} is not valid YAML{_position(err)}: {_problem(err)}", hint=_HINT
        ) from None
    except RecursionError:
        raise BadConfigError(
            f"{source}: the YAML document is nested too deeply to parse", hint=_HINT
        ) from None
    except ValueError as err:  # e.g. an integer literal longer than Python converts (4300 digits)
        raise BadConfigError(f"{source}: a YAML value cannot be read: {short_repr(str(err), 120)}") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml_file(path: str | Path, what: str = "config file") -> Any:
    """:func:`load_yaml` of a file, with missing, unreadable and oversized files as BadConfigError."""
    path = Path(path)
    try:
        if not path.is_file():
            raise BadConfigError(
                f"{what} {path} not found (or not a file)", hint="Pass a YAML file, e.g. configs/."
            )
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise BadConfigError(f"{what} {path} is {size} bytes; YAML over {MAX_BYTES} bytes is refused")
        data = path.read_bytes()
    except (OSError, ValueError) as err:  # ValueError: a NUL byte in the path
        raise BadConfigError(
            f"cannot read {what} {short_repr(str(path))}: {getattr(err, 'strerror', None) or err}",
            hint="Check the path and its permissions.",
        ) from None
    return load_yaml(data, str(path))
