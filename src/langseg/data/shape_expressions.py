"""Referring expressions for ShapeWorld scenes, unique by construction.

Grammar (every expression the generator writes is a sentence of it)::

    expression  := "the" description [position | relation]
    description := [size] [colour] shape            e.g. "large circle", "red triangle", "star"
    position    := "on the left" | "on the right" | "at the top" | "at the bottom"
    relation    := ("left of" | "right of" | "above" | "below") "the" description

Meaning, with x to the right, y downwards and ``margin = MARGIN * image size``:

- a *description* matches the objects that have every attribute word it names;
- ``D on the left`` is the object matching D whose centre x is smallest, by at least ``margin`` below
  every other match (likewise right: largest x; top: smallest y; bottom: largest y). Positions are only
  used when D alone matches two or more objects, so that the position is what disambiguates;
- ``D1 left of the D2``: D2 must match exactly one object L (the landmark); the target is the one object
  T != L matching D1 with ``L.x - T.x >= margin`` and ``L.x - T.x > |L.y - T.y|`` (mostly left, not mostly
  above or below); likewise for right of, above and below. Relations are only used when D1 alone is
  ambiguous.

Each candidate is kept only when exactly one object satisfies it, and it is that object.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from langseg.data.shapes import Scene, ShapeObject

MARGIN = 0.06
POSITIONS: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
RELATIONS: dict[str, str] = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
KINDS: tuple[str, ...] = ("attribute", "position", "relation")
# The kinds of ShapeWorld-Ref's hard split: the ones that need the rest of the image.
HARD_KINDS: tuple[str, ...] = ("position", "relation")

Description = tuple[str | None, str | None, str]  # (size, colour, shape); None = word not used


@dataclass(frozen=True)
class Expression:
    """A referring expression and the object it picks out.

    Attributes:
        text: the sentence, e.g. ``"the large circle on the left"``.
        target: index of the referred object in ``scene.objects``.
        kind: ``attribute``, ``position`` or ``relation``.
    """

    text: str
    target: int
    kind: str

    def to_json(self) -> dict:
        return {"text": self.text, "target": self.target, "kind": self.kind}


def description_text(desc: Description) -> str:
    return " ".join(word for word in desc if word)


def matches(obj: ShapeObject, desc: Description) -> bool:
    size, colour, shape = desc
    return obj.shape == shape and size in (None, obj.size) and colour in (None, obj.colour)


def descriptions_of(obj: ShapeObject) -> list[Description]:
    """Every description that names ``obj``, shortest first."""
    return [
        (None, None, obj.shape),
        (None, obj.colour, obj.shape),
        (obj.size, None, obj.shape),
        (obj.size, obj.colour, obj.shape),
    ]


def extreme_object(objects: list[ShapeObject], direction: str, margin: float) -> ShapeObject | None:
    """The object that is clearly furthest in ``direction`` (left/right/top/bottom), or ``None``."""
    key = {
        "left": lambda o: o.cx,
        "right": lambda o: -o.cx,
        "top": lambda o: o.cy,
        "bottom": lambda o: -o.cy,
    }[direction]
    ranked = sorted(objects, key=key)
    if len(ranked) >= 2 and key(ranked[1]) - key(ranked[0]) >= margin:
        return ranked[0]
    return None


def in_relation(target: ShapeObject, landmark: ShapeObject, relation: str, margin: float) -> bool:
    """Whether ``target`` is clearly ``relation`` (left/right/above/below) of ``landmark``."""
    dx, dy = landmark.cx - target.cx, landmark.cy - target.cy  # positive: target is left of / above
    along, across = {"left": (dx, dy), "right": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return along >= margin and along > abs(across)


def all_expressions(scene: Scene) -> list[Expression]:
    """Every expression of the grammar, up to one landmark description each, that resolves uniquely."""
    objects = scene.objects
    margin = MARGIN * scene.config.size
    found: list[Expression] = []
    for target in objects:
        for desc in descriptions_of(target):
            matched = [o for o in objects if matches(o, desc)]
            text = "the " + description_text(desc)
            if len(matched) == 1:
                found.append(Expression(text, target.index, "attribute"))
                continue
            for direction, phrase in POSITIONS.items():
                if extreme_object(matched, direction, margin) is target:
                    found.append(Expression(f"{text} {phrase}", target.index, "position"))
            for landmark, relation in itertools.product(objects, RELATIONS):
                if landmark is target:
                    continue
                holders = [
                    o for o in matched if o is not landmark and in_relation(o, landmark, relation, margin)
                ]
                if holders != [target]:
                    continue
                landmark_desc = _shortest_unique_description(landmark, objects)
                if landmark_desc is not None:
                    phrase = f"{RELATIONS[relation]} the {description_text(landmark_desc)}"
                    found.append(Expression(f"{text} {phrase}", target.index, "relation"))
    return found


def _shortest_unique_description(obj: ShapeObject, objects: list[ShapeObject]) -> Description | None:
    for desc in descriptions_of(obj):
        if sum(matches(o, desc) for o in objects) == 1:
            return desc
    return None


def referring_expressions(
    scene: Scene,
    rng: np.random.Generator,
    per_object: int = 3,
    kinds: Collection[str] = KINDS,
    targets: Collection[int] | None = None,
) -> list[Expression]:
    """A balanced selection of :func:`all_expressions`.

    Per object: one random expression of each available kind (attribute, position, relation), then
    random extras, up to ``per_object``. Only expressions of ``kinds`` about objects in ``targets``
    (``None``: every object) are candidates; the defaults select as before these filters existed.
    Returned sorted by (target, kind, text).
    """
    by_target: dict[int, dict[str, list[Expression]]] = {}
    for expr in all_expressions(scene):
        if expr.kind in kinds and (targets is None or expr.target in targets):
            by_target.setdefault(expr.target, {}).setdefault(expr.kind, []).append(expr)
    chosen: list[Expression] = []
    for target in sorted(by_target):
        pools = {kind: sorted(set(exprs), key=lambda e: e.text) for kind, exprs in by_target[target].items()}
        picks: list[Expression] = []
        for kind in KINDS:
            if kind in pools:
                picks.append(pools[kind].pop(int(rng.integers(len(pools[kind])))))
        rest = [e for kind in KINDS for e in pools.get(kind, [])]
        order = rng.permutation(len(rest))
        picks.extend(rest[i] for i in order)
        chosen.extend(picks[:per_object])
    return sorted(chosen, key=lambda e: (e.target, KINDS.index(e.kind), e.text))
