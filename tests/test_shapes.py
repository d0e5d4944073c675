"""ShapeWorld: determinism, geometry, semantic targets and uniquely resolving expressions."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from langseg.data import (
    COLOURS,
    SHAPES,
    ShapeWorldConfig,
    ShapeWorldFolder,
    ShapeWorldReferring,
    ShapeWorldSemantic,
    label_names,
    render_scene,
    scene_expressions,
    write_shapeworld,
)
from langseg.data.shapes import shape_polygon
from langseg.errors import BadConfigError, BadDataError, OutputError


def scene_digest(seed: int, index: int, **config: object) -> str:
    scene = render_scene(seed, index, ShapeWorldConfig(**config))  # type: ignore[arg-type]
    texts = [e.text for e in scene_expressions(scene)]
    blob = scene.image.tobytes() + scene.instances.tobytes() + json.dumps(texts).encode()
    return hashlib.sha256(blob).hexdigest()


# ---------------------------------------------------------------- determinism


def test_same_seed_same_bytes_and_different_seed_different_bytes() -> None:
    for background in ("plain", "noise", "texture"):
        assert scene_digest(3, 7, background=background) == scene_digest(3, 7, background=background)
    assert scene_digest(3, 7) != scene_digest(4, 7)
    assert scene_digest(3, 7) != scene_digest(3, 8)


def test_bytes_identical_in_a_fresh_interpreter() -> None:
    code = (
        "from tests.test_shapes import scene_digest;"
        "print(scene_digest(11, 2, background='texture', allow_overlap=True))"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == scene_digest(11, 2, background="texture", allow_overlap=True)


def test_random_access_does_not_depend_on_order() -> None:
    forward = [scene_digest(5, i) for i in range(4)]
    backward = [scene_digest(5, i) for i in reversed(range(4))]
    assert forward == backward[::-1]


# ---------------------------------------------------------------- geometry and appearance


def literal_object_mask(obj, size: int) -> np.ndarray:
    """The object drawn alone, from its recorded geometry (no occlusion)."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if obj.shape == "circle":
        draw.ellipse(
            (obj.cx - obj.radius, obj.cy - obj.radius, obj.cx + obj.radius, obj.cy + obj.radius), fill=1
        )
    else:
        draw.polygon(shape_polygon(obj.shape, obj.cx, obj.cy, obj.radius, obj.rotation), fill=1)
    return np.asarray(canvas).astype(bool)


def test_scenes_respect_the_config_and_do_not_overlap() -> None:
    config = ShapeWorldConfig()
    counts = Counter()
    for i in range(60):
        scene = render_scene(0, i, config)
        assert scene.image.shape == (256, 256, 3) and scene.image.dtype == np.uint8
        assert 2 <= len(scene.objects) <= 6
        for obj in scene.objects:
            counts.update([obj.shape, obj.colour, obj.size])
            alone = literal_object_mask(obj, config.size)
            visible = scene.object_mask(obj.index)
            # Non-overlapping by default: every object is fully visible, and its pixels carry its colour.
            assert np.array_equal(alone, visible) and obj.area == alone.sum() > 0
            assert (scene.image[visible] == np.array(obj.rgb, dtype=np.uint8)).all()
            assert obj.radius <= obj.cx <= config.size - obj.radius
            assert obj.radius <= obj.cy <= config.size - obj.radius
    assert {s for s in SHAPES} <= set(counts) and len(SHAPES) >= 5
    assert all(counts[c] > 0 for c in COLOURS) and len(COLOURS) >= 6
    assert counts["small"] > 0 and counts["large"] > 0


def test_large_objects_are_about_twice_the_small_ones() -> None:
    radii = {"small": [], "large": []}
    for i in range(40):
        for obj in render_scene(1, i).objects:
            radii[obj.size].append(obj.radius)
    assert max(radii["small"]) < 0.8 * min(radii["large"])


def test_occlusion_keeps_each_object_mostly_visible() -> None:
    config = ShapeWorldConfig(allow_overlap=True, min_visible=0.5, min_objects=5, max_objects=6)
    occluded = 0
    for i in range(30):
        scene = render_scene(2, i, config)
        for obj in scene.objects:
            full = literal_object_mask(obj, config.size).sum()
            assert obj.area >= 0.5 * full
            occluded += obj.area < full
    assert occluded > 0  # the option really lets objects overlap


def test_backgrounds() -> None:
    plain = render_scene(0, 0, ShapeWorldConfig(background="plain"))
    noise = render_scene(0, 0, ShapeWorldConfig(background="noise"))
    texture = render_scene(0, 0, ShapeWorldConfig(background="texture"))
    bg = plain.instances == 0
    assert plain.image[bg].std() == 0
    assert noise.image[noise.instances == 0].std() > 5
    assert len(np.unique(texture.image[texture.instances == 0].reshape(-1, 3), axis=0)) > 100


def test_semantic_maps_at_each_granularity() -> None:
    config = ShapeWorldConfig()
    scene = render_scene(0, 3, config)
    for granularity in ("shape", "colour", "colour_shape"):
        names = label_names(config, granularity)
        assert names[0] == "background"
        semantic = scene.semantic_map(granularity)
        assert (semantic[scene.instances == 0] == 0).all()
        for obj in scene.objects:
            word = {"shape": obj.shape, "colour": obj.colour, "colour_shape": f"{obj.colour} {obj.shape}"}
            values = np.unique(semantic[scene.object_mask(obj.index)])
            assert [names[v] for v in values] == [word[granularity]]
    assert len(label_names(config, "colour_shape")) == 1 + len(config.colours) * len(config.shapes)


def test_excluded_pairs_never_occur_and_others_do() -> None:
    held_out = (("red", "circle"), ("blue", "star"))
    config = ShapeWorldConfig(exclude_pairs=held_out)
    seen = {(o.colour, o.shape) for i in range(150) for o in render_scene(0, i, config).objects}
    assert not seen & set(held_out)
    assert len(seen) > 30  # the other 38 pairs keep appearing
    assert ("red", "square") in seen and ("green", "circle") in seen  # the held-out words still occur


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": 8},
        {"min_objects": 0},
        {"min_objects": 5, "max_objects": 3},
        {"shapes": ("blob",)},
        {"colours": ()},
        {"background": "fuzzy"},
        {"min_visible": 0.0},
        {"exclude_pairs": (("red", "blob"),)},
    ],
)
def test_bad_config_is_a_clear_error(kwargs: dict) -> None:
    with pytest.raises(BadConfigError) as info:
        ShapeWorldConfig(**kwargs)
    assert info.value.hint


# ---------------------------------------------------------------- referring expressions

# An independent resolver: parses the documented grammar and applies the documented meaning.
WORD = {"size": ("small", "large"), "colour": tuple(COLOURS), "shape": SHAPES}
DESC = r"(?:(small|large) )?(?:({colours}) )?({shapes})".format(
    colours="|".join(COLOURS), shapes="|".join(SHAPES)
)
GRAMMAR = re.compile(
    rf"^the {DESC}(?: (on the left|on the right|at the top|at the bottom)"
    rf"| (left of|right of|above|below) the {DESC})?$"
)


def resolve(text: str, objects: list, image_size: int) -> list[int]:
    m = GRAMMAR.match(text)
    assert m, f"expression outside the grammar: {text!r}"
    size, colour, shape, position, relation, l_size, l_colour, l_shape = m.groups()
    margin = 0.06 * image_size

    def named(o, s, c, sh):
        return o.shape == sh and (s is None or o.size == s) and (c is None or o.colour == c)

    cands = [o for o in objects if named(o, size, colour, shape)]
    if position:
        coord = {
            "on the left": lambda o: o.cx,
            "on the right": lambda o: -o.cx,
            "at the top": lambda o: o.cy,
            "at the bottom": lambda o: -o.cy,
        }[position]
        assert len(cands) >= 2, f"position used where the description alone is unique: {text!r}"
        return [o.index for o in cands if all(coord(p) >= coord(o) + margin for p in cands if p is not o)]
    if relation:
        landmarks = [o for o in objects if named(o, l_size, l_colour, l_shape)]
        assert len(landmarks) == 1, f"landmark not unique in {text!r}"
        (lm,) = landmarks
        out = []
        for o in cands:
            if o is lm:
                continue
            dx, dy = lm.cx - o.cx, lm.cy - o.cy
            along, across = {
                "left of": (dx, dy),
                "right of": (-dx, dy),
                "above": (dy, dx),
                "below": (-dy, dx),
            }[relation]
            if along >= margin and along > abs(across):
                out.append(o.index)
        return out
    return [o.index for o in cands]


@pytest.mark.parametrize(
    "config", [ShapeWorldConfig(), ShapeWorldConfig(allow_overlap=True, background="texture")]
)
def test_every_expression_resolves_to_exactly_its_object(config: ShapeWorldConfig) -> None:
    kinds = Counter()
    for i in range(150):
        scene = render_scene(0, i, config)
        expressions = scene_expressions(scene)
        assert len({e.text for e in expressions}) == len(expressions)
        for expr in expressions:
            assert resolve(expr.text, scene.objects, config.size) == [expr.target], expr.text
            assert scene.object_mask(expr.target).any()
            kinds[expr.kind] += 1
    assert min(kinds[k] for k in ("attribute", "position", "relation")) > 50, kinds


def test_resolver_rejects_what_it_should() -> None:
    # Guard the guard: a deliberately ambiguous expression resolves to several objects.
    scene = render_scene(0, 55)
    squares = [o.index for o in scene.objects if o.shape == "square"]
    assert len(squares) >= 2 and resolve("the square", scene.objects, 256) == squares


def test_the_seed_example_occurs() -> None:
    found = [
        (i, e)
        for i in range(120)
        for e in scene_expressions(render_scene(0, i))
        if e.text == "the large circle on the left"
    ]
    assert found
    i, expr = found[0]
    scene = render_scene(0, i)
    circles = [o for o in scene.objects if o.shape == "circle" and o.size == "large"]
    assert len(circles) >= 2 and min(circles, key=lambda o: o.cx).index == expr.target


# ---------------------------------------------------------------- datasets and disk format


def test_semantic_dataset_sample() -> None:
    ds = ShapeWorldSemantic(4, seed=1, granularity="shape")
    sample = ds[2]
    scene = render_scene(1, 2)
    assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (3, 256, 256)
    assert torch.equal(sample["image"], torch.from_numpy(scene.image).permute(2, 0, 1))
    assert sample["mask"].dtype == torch.int64
    assert torch.equal(sample["mask"], torch.from_numpy(scene.semantic_map("shape")))
    assert sample["labels"] == ["background", *SHAPES]
    with pytest.raises(IndexError):
        ds[4]


def test_referring_dataset_sample() -> None:
    ds = ShapeWorldReferring(5, seed=2)
    expected = sum(len(scene_expressions(render_scene(2, i))) for i in range(5))
    assert len(ds) == expected
    for item in range(0, len(ds), 4):
        sample = ds[item]
        scene = render_scene(2, sample["meta"]["index"])
        assert sample["mask"].dtype == torch.bool
        assert resolve(sample["text"], scene.objects, 256) == [sample["meta"]["target"]]
        assert torch.equal(sample["mask"], torch.from_numpy(scene.instances == sample["meta"]["target"] + 1))


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_written_world_is_deterministic_and_reads_back(tmp_path: Path) -> None:
    config = ShapeWorldConfig(size=96, background="noise")
    a = write_shapeworld(tmp_path / "a", 6, seed=9, config=config, granularity="colour")
    b = write_shapeworld(tmp_path / "b", 6, seed=9, config=config, granularity="colour")
    assert tree_digest(a) == tree_digest(b)
    assert len(tree_digest(a)) == 1 + 6 * 4

    semantic = ShapeWorldFolder(a, task="semantic")
    memory = ShapeWorldSemantic(6, seed=9, config=config, granularity="colour")
    assert semantic.labels == memory.labels and len(semantic) == 6
    for i in range(6):
        assert torch.equal(semantic[i]["image"], memory[i]["image"])
        assert torch.equal(semantic[i]["mask"], memory[i]["mask"])

    referring = ShapeWorldFolder(a, task="referring")
    in_memory = ShapeWorldReferring(6, seed=9, config=config)
    assert len(referring) == len(in_memory)
    for i in range(len(referring)):
        disk, mem = referring[i], in_memory[i]
        assert disk["text"] == mem["text"] and torch.equal(disk["mask"], mem["mask"])


def test_write_refuses_to_clobber_and_reports_bad_output(tmp_path: Path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError):
        write_shapeworld(tmp_path / "busy", 2)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"

    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(OutputError):
        write_shapeworld(blocker / "sub", 2)
    with pytest.raises(BadConfigError):
        write_shapeworld(tmp_path / "neg", -1)


def test_folder_errors_name_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BadDataError, match=r"world\.json"):
        ShapeWorldFolder(tmp_path)
    root = write_shapeworld(tmp_path / "w", 2, config=ShapeWorldConfig(size=64))
    (root / "images" / "000001.png").unlink()
    ds = ShapeWorldFolder(root)
    with pytest.raises(BadDataError, match=r"000001\.png"):
        ds[1]


def test_variety_cycles_backgrounds_and_shrinks_larger_renders() -> None:
    """Scene i takes background i % 3 and render size (i // 3) % 2, then comes back at the dataset size:
    the image bicubic-antialiased (as the predictors shrink images), semantic masks by nearest (torch's:
    the top-left pixel of each block), referring masks where at least half the pixels are the object."""
    import torch.nn.functional as F

    kinds, sizes = ("plain", "noise", "texture"), (64, 256)
    world = ShapeWorldConfig(size=64)
    semantic = ShapeWorldSemantic(6, seed=3, config=world, backgrounds=kinds, render_sizes=sizes)
    assert all(
        semantic[i]["image"].shape == (3, 64, 64) and semantic[i]["mask"].shape == (64, 64) for i in range(6)
    )
    # Scene 1 is rendered as it is (noise, 64 px), scene 3 at 256 px over plain grey and shrunk.
    native = render_scene(3, 1, ShapeWorldConfig(size=64, background="noise"))
    assert np.array_equal(semantic[1]["image"].permute(1, 2, 0).numpy(), native.image)
    big = render_scene(3, 3, ShapeWorldConfig(size=256, background="plain"))
    pixels = torch.from_numpy(big.image).permute(2, 0, 1)[None].float()
    shrunk = F.interpolate(pixels, size=(64, 64), mode="bicubic", align_corners=False, antialias=True)
    assert torch.equal(semantic[3]["image"], shrunk[0].round().clamp(0, 255).to(torch.uint8))
    assert torch.equal(semantic[3]["mask"], torch.from_numpy(big.semantic_map()[::4, ::4]))
    referring = ShapeWorldReferring(6, seed=3, config=world, backgrounds=kinds, render_sizes=sizes)
    sample = next(s for s in referring if s["meta"]["index"] == 3)
    full = torch.from_numpy(big.object_mask(sample["meta"]["target"])).float()
    coverage = full.reshape(64, 4, 64, 4).mean(dim=(1, 3))
    assert sample["mask"].dtype == torch.bool and torch.equal(sample["mask"], coverage >= 0.5)
    with pytest.raises(BadConfigError):
        ShapeWorldSemantic(2, config=world, backgrounds=("plain", "fog"))
    with pytest.raises(BadConfigError):
        ShapeWorldSemantic(2, config=world, render_sizes=(16,))
