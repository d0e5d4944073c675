"""ShapeWorld: a seeded, deterministic renderer of synthetic scenes.

The offline world on which langseg's small models train and on which the papers' ablations are re-run.
A scene holds 2-6 objects, each a shape (circle, square, triangle, star, hexagon), a named colour, a size
(small or large) and a position, drawn over a plain, noisy or textured background. Every scene is a pure
function of ``(seed, index)`` and the config, so datasets have random access and any DataLoader worker
layout gives the same bytes.

Semantic targets are derived from the instance map at a chosen label granularity (``shape``, ``colour``
or ``colour_shape``); referring expressions are built in :mod:`langseg.data.shape_expressions`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

from langseg.errors import BadConfigError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon")
# Named colours with well separated hues; RGB chosen to be distinct under the per-object jitter below.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (245, 140, 25),
    "yellow": (240, 220, 40),
    "green": (40, 165, 60),
    "cyan": (40, 200, 215),
    "blue": (40, 75, 215),
    "purple": (135, 55, 185),
    "white": (245, 245, 245),
}
SIZES: tuple[str, ...] = ("small", "large")
Granularity = Literal["shape", "colour", "colour_shape"]
GRANULARITIES: tuple[str, ...] = ("shape", "colour", "colour_shape")
Background = Literal["plain", "noise", "texture"]

# Circumradius as a fraction of the image side, per size class: large is about twice small, so that
# "the large circle" is unambiguous to the eye.
_RADIUS_RANGE = {"small": (0.055, 0.075), "large": (0.11, 0.14)}
# Upper bounds that keep a typo from allocating absurd memory (an 8192 x 8192 RGB scene is 200 MB).
MAX_SIZE = 8192
MAX_OBJECTS = 16
# Attempts at drawing and placing a scene before giving up with an error naming the settings: a geometric
# pre-check refuses what can never fit, and these bounds catch what is merely (astronomically) unlikely.
# 16 non-overlapping objects at the default gap take 325 attempts on average (1807 at most over 300
# scenes), so a scene that needs more than 5000 is as good as impossible (and 5000 attempts take seconds).
MAX_PLACEMENT_ATTEMPTS = 5_000
MAX_VISIBILITY_ATTEMPTS = 1_000  # retries for allow_overlap's min_visible (each renders the scene)
# Rotation range in degrees per shape; squares and triangles stay close to upright so they keep their
# everyday appearance (a square at 45 degrees reads as a diamond).
_ROTATION_RANGE = {"circle": 0.0, "square": 15.0, "triangle": 15.0, "star": 36.0, "hexagon": 30.0}


@dataclass(frozen=True)
class ShapeWorldConfig:
    """How scenes are drawn.

    Attributes:
        size: image side in pixels (square images).
        min_objects, max_objects: number of objects per scene (inclusive range).
        shapes, colours: vocabularies to draw from (subsets of :data:`SHAPES` and :data:`COLOURS`).
        background: ``plain`` (uniform grey), ``noise`` (grey plus per-pixel noise over the whole image)
            or ``texture`` (smooth random colour fields, so colour alone is not always enough).
        allow_overlap: let objects occlude each other (later objects on top); each keeps at least
            ``min_visible`` of its area visible.
        min_visible: smallest visible fraction of an occluded object.
        colour_jitter: per-object RGB jitter (uniform, +-), so one colour name covers a small range.
        gap: minimum gap between circumscribed circles of non-overlapping objects, fraction of ``size``.
        exclude_pairs: ``(colour, shape)`` pairs never drawn, e.g. to hold them out for a compositional
            zero-shot split (train without "red circle", test on it; both words were seen).
        twins: every scene holds at least one pair of objects of the same colour and shape (size, place
            and rotation drawn as usual), at least 2 objects per scene: the world of ShapeWorld-Ref's
            ``hard`` split, where only position or relation tells such objects apart. Off by default;
            when off, scenes are drawn exactly as before the setting existed.
    """

    size: int = 256
    min_objects: int = 2
    max_objects: int = 6
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = tuple(COLOURS)
    background: Background = "plain"
    allow_overlap: bool = False
    min_visible: float = 0.4
    colour_jitter: int = 12
    gap: float = 0.02
    exclude_pairs: tuple[tuple[str, str], ...] = ()
    twins: bool = False

    def __post_init__(self) -> None:
        _check_types(self)
        if not 32 <= self.size <= MAX_SIZE:
            raise BadConfigError(
                f"ShapeWorld size must be 32 to {MAX_SIZE} pixels, got {self.size}",
                hint="Set size to the image side you want, e.g. 64, 128 or 256.",
            )
        if not 1 <= self.min_objects <= self.max_objects <= MAX_OBJECTS:
            raise BadConfigError(
                f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, "
                f"got {self.min_objects}..{self.max_objects}"
            )
        if not 0 <= self.colour_jitter <= 255:
            raise BadConfigError(f"colour_jitter must be 0 to 255, got {self.colour_jitter}")
        if not 0.0 <= self.gap < 1.0:
            raise BadConfigError(
                f"gap must be in [0, 1) (a fraction of the image side), got {self.gap}",
                hint="The default is 0.02: objects at least 2% of the side apart.",
            )
        unknown = [s for s in self.shapes if s not in SHAPES] + [c for c in self.colours if c not in COLOURS]
        if unknown or not self.shapes or not self.colours:
            raise BadConfigError(
                f"unknown or empty shapes/colours: {unknown}",
                hint=f"Shapes: {', '.join(SHAPES)}. Colours: {', '.join(COLOURS)}.",
            )
        if self.background not in ("plain", "noise", "texture"):
            raise BadConfigError(
                f"unknown background {self.background!r}", hint="Use plain, noise or texture."
            )
        pairs = [(c, s) for c in self.colours for s in self.shapes]
        if any(tuple(p) not in pairs for p in self.exclude_pairs) or len(self.exclude_pairs) >= len(pairs):
            raise BadConfigError(
                f"exclude_pairs must be (colour, shape) pairs of this world, not all: {self.exclude_pairs}"
            )
        if not 0.0 < self.min_visible <= 1.0:
            raise BadConfigError(f"min_visible must be in (0, 1], got {self.min_visible}")
        if self.twins and self.max_objects < 2:
            raise BadConfigError(
                f"twins needs scenes of 2 or more objects, got max_objects {self.max_objects}",
                hint="Raise max_objects to 2 or more (the default is 6).",
            )
        _check_fits(self)


def _check_types(config: ShapeWorldConfig) -> None:
    """BadConfigError for a setting of the wrong type (e.g. ``size: 64.5`` would fail only when drawing)."""

    def bad(name: str, expected: str) -> BadConfigError:
        value = repr(getattr(config, name))
        value = value if len(value) <= 60 else value[:57] + "..."
        return BadConfigError(f"ShapeWorld setting {name!r} must be {expected}, got {value}")

    for name in ("size", "min_objects", "max_objects", "colour_jitter"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(name, "an integer")
    for name in ("min_visible", "gap"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad(name, "a finite number")
    for name in ("allow_overlap", "twins"):
        if not isinstance(getattr(config, name), bool):
            raise bad(name, "true or false")
    if not isinstance(config.background, str):
        raise bad("background", "plain, noise or texture")
    for name in ("shapes", "colours"):
        if not isinstance(getattr(config, name), tuple) or not all(
            isinstance(w, str) for w in getattr(config, name)
        ):
            raise bad(name, "a list of names")
    pairs = config.exclude_pairs
    if not isinstance(pairs, tuple) or not all(
        isinstance(p, tuple) and len(p) == 2 and all(isinstance(w, str) for w in p) for p in pairs
    ):
        raise bad("exclude_pairs", "a list of [colour, shape] pairs")


def _check_fits(config: ShapeWorldConfig) -> None:
    """Refuse worlds whose ``min_objects`` can never be placed apart (e.g. ``gap: 5``), so that rendering
    fails now with the settings named instead of searching for ever.

    Necessary conditions with every object at the smallest radius ``r``: centres lie in a square of side
    ``L = size - 2r - 4`` and any two are at least ``d = 2r + gap * size`` apart, so two objects need
    ``d <= sqrt(2) L``, and by Oler's inequality (points ``d`` apart in a convex region of area ``A`` and
    perimeter ``P`` number at most ``2 A / (sqrt(3) d^2) + P / (2 d) + 1``) ``k`` objects need
    ``k <= 2 L^2 / (sqrt(3) d^2) + 2 L / d + 1``.
    """
    k = max(config.min_objects, 2) if config.twins else config.min_objects
    if config.allow_overlap or k < 2:
        return
    n = config.size
    r = _RADIUS_RANGE["small"][0] * n
    side = n - 2 * r - 4
    d = 2 * r + config.gap * n
    if d > math.sqrt(2) * side or k > 2 * side**2 / (math.sqrt(3) * d**2) + 2 * side / d + 1:
        raise BadConfigError(
            f"ShapeWorld cannot place {k} objects {config.gap} x size apart in a {n} x {n} image: gap "
            f"{config.gap} with min_objects {k} makes every scene impossible",
            hint="Lower gap (default 0.02) or min_objects, raise size, or set allow_overlap: true.",
        )


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene. Coordinates are pixels, x to the right and y downwards.

    Attributes:
        index: position in the scene's drawing order (later objects are drawn on top); the instance map
            stores ``index + 1``.
        shape, colour, size: the attribute words.
        cx, cy: centre; radius: circumscribed radius; rotation: degrees.
        rgb: the drawn colour (named colour plus jitter).
        area: visible pixel count in the rendered scene.
    """

    index: int
    shape: str
    colour: str
    size: str
    cx: float
    cy: float
    radius: float
    rotation: float
    rgb: tuple[int, int, int]
    area: int = 0

    def words(self) -> tuple[str, str, str]:
        """(size, colour, shape)."""
        return self.size, self.colour, self.shape

    def to_json(self) -> dict:
        return {
            "index": self.index,
            "shape": self.shape,
            "colour": self.colour,
            "size": self.size,
            "center": [round(self.cx, 3), round(self.cy, 3)],
            "radius": round(self.radius, 3),
            "rotation": round(self.rotation, 3),
            "rgb": list(self.rgb),
            "area": self.area,
        }


@dataclass
class Scene:
    """A rendered scene.

    Attributes:
        image: H x W x 3 uint8 RGB.
        instances: H x W uint8, 0 for background and ``k + 1`` for object ``k`` (visible pixels only).
        objects: the objects in drawing order.
        seed, index: where the scene came from; ``render_scene(seed, index, config)`` reproduces it.
    """

    image: np.ndarray
    instances: np.ndarray
    objects: list[ShapeObject]
    seed: int
    index: int
    config: ShapeWorldConfig = field(repr=False)

    def object_mask(self, k: int) -> np.ndarray:
        """H x W bool mask of object ``k``'s visible pixels."""
        return self.instances == k + 1

    def semantic_map(self, granularity: Granularity = "colour_shape") -> np.ndarray:
        """H x W int64 class map under ``granularity``; class names are :func:`label_names`."""
        names = label_names(self.config, granularity)
        lookup = np.zeros(len(self.objects) + 1, dtype=np.int64)
        for obj in self.objects:
            lookup[obj.index + 1] = names.index(object_label(obj, granularity))
        return lookup[self.instances]


def label_names(config: ShapeWorldConfig, granularity: Granularity = "colour_shape") -> list[str]:
    """Class names, index 0 being ``background``: e.g. ``["background", "red circle", ...]``."""
    if granularity == "shape":
        return ["background", *config.shapes]
    if granularity == "colour":
        return ["background", *config.colours]
    if granularity == "colour_shape":
        return ["background", *(f"{c} {s}" for c in config.colours for s in config.shapes)]
    raise BadConfigError(
        f"unknown label granularity {granularity!r}", hint=f"Use one of {', '.join(GRANULARITIES)}."
    )


def object_label(obj: ShapeObject, granularity: Granularity) -> str:
    """The class name of ``obj`` under ``granularity``."""
    return {"shape": obj.shape, "colour": obj.colour, "colour_shape": f"{obj.colour} {obj.shape}"}[
        granularity
    ]


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """Independent generator for scene ``index`` of world ``seed`` (random access, worker-independent)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, index])))


def shape_polygon(
    shape: str, cx: float, cy: float, radius: float, rotation: float
) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape with the given circumradius; rotation in degrees, clockwise on screen."""
    if shape == "square":
        angles, radii = [45.0, 135.0, 225.0, 315.0], [radius] * 4
    elif shape == "triangle":
        angles, radii = [-90.0, 30.0, 150.0], [radius] * 3  # apex up
    elif shape == "hexagon":
        angles, radii = [60.0 * i for i in range(6)], [radius] * 6
    elif shape == "star":
        angles = [-90.0 + 36.0 * i for i in range(10)]
        radii = [radius if i % 2 == 0 else radius * 0.45 for i in range(10)]
    else:
        raise ValueError(f"{shape!r} is not a polygonal shape")
    points = []
    for angle, r in zip(angles, radii, strict=True):
        theta = math.radians(angle + rotation)
        points.append((cx + r * math.cos(theta), cy + r * math.sin(theta)))
    return points


def _draw_object(draw: ImageDraw.ImageDraw, obj: ShapeObject, fill: int) -> None:
    if obj.shape == "circle":
        r = obj.radius
        draw.ellipse((obj.cx - r, obj.cy - r, obj.cx + r, obj.cy + r), fill=fill)
    else:
        draw.polygon(shape_polygon(obj.shape, obj.cx, obj.cy, obj.radius, obj.rotation), fill=fill)


def _background(rng: np.random.Generator, config: ShapeWorldConfig) -> np.ndarray:
    """H x W x 3 uint8 background; grey levels avoid the named colours' extremes."""
    n = config.size
    if config.background == "texture":
        # Smooth colour fields: a coarse random colour grid upsampled bilinearly, muted towards grey so
        # that it resembles, but does not equal, the named colours.
        cells = int(rng.integers(3, 9))
        grid = rng.integers(40, 216, size=(cells, cells, 3), dtype=np.uint8)
        grey = np.full_like(grid, 128)
        grid = ((grid.astype(np.uint16) * 3 + grey) // 4).astype(np.uint8)
        return np.asarray(Image.fromarray(grid).resize((n, n), Image.BILINEAR))
    level = int(rng.integers(90, 166))
    return np.full((n, n, 3), level, dtype=np.uint8)


def allowed_pairs(config: ShapeWorldConfig) -> list[tuple[str, str]]:
    """The ``(colour, shape)`` pairs this world draws."""
    excluded = {tuple(p) for p in config.exclude_pairs}
    return [(c, s) for c in config.colours for s in config.shapes if (c, s) not in excluded]


def has_twin(obj: ShapeObject, objects: list[ShapeObject]) -> bool:
    """Whether another object of ``objects`` has ``obj``'s colour and shape (so no attribute but size
    can tell them apart)."""
    return any(o is not obj and o.colour == obj.colour and o.shape == obj.shape for o in objects)


def _sample_object(
    rng: np.random.Generator, config: ShapeWorldConfig, index: int, like: ShapeObject | None = None
) -> ShapeObject:
    """A new object (not yet placed); ``like``: take its colour and shape (a twin), draw the rest."""
    if like is not None:
        colour, shape = like.colour, like.shape
    elif config.exclude_pairs:
        colour, shape = allowed_pairs(config)[int(rng.integers(len(allowed_pairs(config))))]
    else:  # two independent draws: the stream every default world was rendered with
        shape = config.shapes[int(rng.integers(len(config.shapes)))]
        colour = config.colours[int(rng.integers(len(config.colours)))]
    size = SIZES[int(rng.integers(2))]
    low, high = _RADIUS_RANGE[size]
    radius = float(rng.uniform(low, high)) * config.size
    spread = _ROTATION_RANGE[shape]
    rotation = float(rng.uniform(-spread, spread)) if spread else 0.0
    jitter = rng.integers(-config.colour_jitter, config.colour_jitter + 1, size=3)
    rgb = tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + jitter, 0, 255))
    return ShapeObject(index, shape, colour, size, 0.0, 0.0, radius, rotation, rgb)  # type: ignore[arg-type]


def _place(
    rng: np.random.Generator, config: ShapeWorldConfig, obj: ShapeObject, placed: list[ShapeObject]
) -> ShapeObject | None:
    """``obj`` at a random position inside the image, clear of ``placed`` unless overlap is allowed."""
    n = config.size
    margin = 2.0
    for _ in range(64):
        cx = float(rng.uniform(obj.radius + margin, n - obj.radius - margin))
        cy = float(rng.uniform(obj.radius + margin, n - obj.radius - margin))
        if config.allow_overlap or all(
            math.hypot(cx - o.cx, cy - o.cy) >= obj.radius + o.radius + config.gap * n for o in placed
        ):
            return replace(obj, cx=cx, cy=cy)
    return None


def _rasterise(objects: list[ShapeObject], size: int) -> np.ndarray:
    """H x W uint8 instance map, objects drawn in order so later ones occlude earlier ones."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        _draw_object(draw, obj, obj.index + 1)
    return np.asarray(canvas)


def _full_area(obj: ShapeObject, size: int) -> int:
    canvas = Image.new("L", (size, size), 0)
    _draw_object(ImageDraw.Draw(canvas), obj, 1)
    return int(np.count_nonzero(np.asarray(canvas)))


def render_scene(seed: int, index: int, config: ShapeWorldConfig | None = None) -> Scene:
    """Render scene ``index`` of the world ``seed``; the same arguments always give the same bytes."""
    config = config or ShapeWorldConfig()
    rng = scene_rng(seed, index)
    background = _background(rng, config)
    # A twins world needs two objects; the count is drawn over the same range otherwise.
    low = max(config.min_objects, 2) if config.twins else config.min_objects
    count = int(rng.integers(low, config.max_objects + 1))
    placement_failures = visibility_failures = 0
    while True:  # retries only when placement fails; each retry draws fresh attributes from the same rng
        if placement_failures >= MAX_PLACEMENT_ATTEMPTS or visibility_failures >= MAX_VISIBILITY_ATTEMPTS:
            _give_up(config, seed, index, placement_failures, visibility_failures)
        objects: list[ShapeObject] = []
        for k in range(count):
            like = _twin_source(config, objects)
            placed = _place(rng, config, _sample_object(rng, config, k, like), objects)
            if placed is not None:
                objects.append(placed)
        if len(objects) < config.min_objects or (
            config.twins and not any(has_twin(o, objects) for o in objects)
        ):
            placement_failures += 1
            continue
        objects = [replace(o, index=k) for k, o in enumerate(objects)]
        instances = _rasterise(objects, config.size)
        areas = np.bincount(instances.ravel(), minlength=len(objects) + 1)[1:]
        if config.allow_overlap and any(
            areas[o.index] < config.min_visible * _full_area(o, config.size) for o in objects
        ):
            visibility_failures += 1
            continue
        break
    objects = [replace(o, area=int(areas[o.index])) for o in objects]
    image = _paint(rng, config, background, instances, objects)
    return Scene(image=image, instances=instances, objects=objects, seed=seed, index=index, config=config)


def _twin_source(config: ShapeWorldConfig, placed: list[ShapeObject]) -> ShapeObject | None:
    """The object the next one copies in a twins world: the first placed one, until some pair exists
    (so the twin is the second object placed, and a failed placement just moves it one later)."""
    if not config.twins or not placed or any(has_twin(o, placed) for o in placed):
        return None
    return placed[0]


def _give_up(config: ShapeWorldConfig, seed: int, index: int, placements: int, visibility: int) -> None:
    """Raise the BadConfigError of a scene that could not be drawn within the attempt bounds."""
    if visibility >= MAX_VISIBILITY_ATTEMPTS:
        why = (
            f"no arrangement kept min_visible {config.min_visible} of every object visible in "
            f"{visibility} attempts"
        )
        hint = "Lower min_visible (default 0.4) or max_objects, or set allow_overlap: false."
    else:
        why = (
            f"{config.min_objects} objects could not be placed {config.gap} x size apart in {placements} "
            f"attempts (min_objects {config.min_objects}, gap {config.gap}, size {config.size})"
        )
        hint = "Lower gap (default 0.02) or min_objects, raise size, or set allow_overlap: true."
    raise BadConfigError(f"ShapeWorld scene {index} of world {seed}: {why}", hint=hint)


def _paint(
    rng: np.random.Generator,
    config: ShapeWorldConfig,
    background: np.ndarray,
    instances: np.ndarray,
    objects: list[ShapeObject],
) -> np.ndarray:
    """H x W x 3 uint8 image: objects' colours over the background, plus noise if configured."""
    palette = np.array([(0, 0, 0), *(o.rgb for o in objects)], dtype=np.uint8)
    image = np.where(instances[..., None] > 0, palette[instances], background)
    if config.background == "noise":
        # Integer noise is drawn in one call and is several times faster than Gaussian noise.
        noise = rng.integers(-24, 25, size=image.shape, dtype=np.int16)
        image = np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image)
