"""ShapeWorld-Ref's hard split: twin objects, position/relation expressions only, defaults untouched."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from langseg.data import (
    ShapeWorldConfig,
    ShapeWorldFolder,
    ShapeWorldReferring,
    build_dataset,
    render_scene,
    scene_expressions,
    write_shapeworld,
)
from langseg.errors import BadConfigError
from tests.test_shapes import resolve


def twins_of(obj, objects) -> list[int]:
    """Indices of the other objects with ``obj``'s colour and shape (written out, not the library's)."""
    return [
        o.index for o in objects if o.index != obj.index and (o.colour, o.shape) == (obj.colour, obj.shape)
    ]


@pytest.mark.parametrize(
    "config",
    [
        ShapeWorldConfig(size=64),
        ShapeWorldConfig(size=256, background="texture", allow_overlap=True),
        ShapeWorldConfig(size=64, exclude_pairs=(("red", "circle"),), max_objects=3),
    ],
)
def test_every_hard_sample_needs_place_to_find_its_referent(config: ShapeWorldConfig) -> None:
    data = ShapeWorldReferring(80, seed=3, config=config, hard=True)
    kinds = Counter()
    for item in range(len(data)):
        scene_index, expr = data.index[item]
        scene = render_scene(3, scene_index, data.config)
        target = scene.objects[expr.target]
        # The referent shares colour and shape with a distractor; only place tells them apart.
        assert twins_of(target, scene.objects), expr.text
        assert expr.kind in ("position", "relation")
        assert resolve(expr.text, scene.objects, config.size) == [expr.target], expr.text
        kinds[expr.kind] += 1
    sample = data[len(data) // 2]
    scene = render_scene(3, sample["meta"]["index"], data.config)
    assert torch.equal(sample["mask"], torch.from_numpy(scene.instances == sample["meta"]["target"] + 1))
    assert sample["meta"]["kind"] in ("position", "relation")
    # Both kinds occur in quantity (about 58% position, 42% relation at the defaults).
    assert min(kinds["position"], kinds["relation"]) > 0.25 * len(data), kinds
    assert len(data) >= 4 * 80  # about 6 expressions per scene (per_object 3, two twins per scene)


def test_twins_world_always_holds_a_pair_and_is_deterministic() -> None:
    config = ShapeWorldConfig(size=64, twins=True, min_objects=1, max_objects=4)
    for i in range(60):
        scene = render_scene(5, i, config)
        assert 2 <= len(scene.objects) <= 4
        assert any(twins_of(o, scene.objects) for o in scene.objects)
        again = render_scene(5, i, config)
        assert scene.image.tobytes() == again.image.tobytes()
        assert [o.to_json() for o in scene.objects] == [o.to_json() for o in again.objects]
    with pytest.raises(BadConfigError, match="twins"):
        ShapeWorldConfig(twins=True, min_objects=1, max_objects=1)
    with pytest.raises(BadConfigError, match="twins"):
        ShapeWorldConfig(twins="yes")  # type: ignore[arg-type]


def test_hard_split_from_the_registry() -> None:
    data = build_dataset("shapeworld-referring", {"num_scenes": 6, "seed": 1, "size": 64, "hard": True})
    direct = ShapeWorldReferring(6, seed=1, config=ShapeWorldConfig(size=64), hard=True)
    assert [(i, e.text) for i, e in data.index] == [(i, e.text) for i, e in direct.index]  # type: ignore[attr-defined]
    with pytest.raises(BadConfigError, match="hard"):
        build_dataset("shapeworld-referring", {"num_scenes": 2, "hard": "yes"})


def test_defaults_are_unchanged() -> None:
    # Digests of the objects and expressions (not the pixels, which depend on PIL's rasteriser) of the
    # default world, measured before the hard split existed: its random streams must not move.
    digest = hashlib.sha256()
    for seed, index, kwargs in ((0, 0, {}), (0, 55, {}), (3, 7, {"size": 64, "background": "noise"})):
        scene = render_scene(seed, index, ShapeWorldConfig(**kwargs))  # type: ignore[arg-type]
        objects = [o.to_json() for o in scene.objects]
        digest.update(json.dumps([objects, [e.to_json() for e in scene_expressions(scene)]]).encode())
    assert digest.hexdigest() == "527590b696b35634d6b4d17fdb97916769d9f86f424ed489a99ec1ae13d8ddce"
    data = ShapeWorldReferring(20, seed=1, config=ShapeWorldConfig(size=64))
    index = json.dumps([(i, e.to_json()) for i, e in data.index]).encode()
    assert hashlib.sha256(index).hexdigest() == (
        "472a982d6e6d7383c0c56e51dcdbee1b3cf833ff4e3e5ff08a34dd0b86766dca"
    )


def test_world_json_records_twins_only_when_set(tmp_path: Path) -> None:
    # A default world's world.json is byte for byte what it was before the setting existed.
    write_shapeworld(tmp_path / "plain", 1, seed=4, config=ShapeWorldConfig(size=32))
    assert hashlib.sha256((tmp_path / "plain" / "world.json").read_bytes()).hexdigest() == (
        "4826116fe1e971d0308338ebd4420af9d3c146aeec83f60a597bbf3a2e9eb45e"
    )
    write_shapeworld(tmp_path / "twins", 2, seed=4, config=ShapeWorldConfig(size=32, twins=True))
    assert json.loads((tmp_path / "twins" / "world.json").read_text())["config"]["twins"] is True
    assert ShapeWorldFolder(tmp_path / "twins").config.twins
