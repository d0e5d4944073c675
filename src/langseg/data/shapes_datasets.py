"""ShapeWorld as torch Datasets, in memory or on disk.

Samples share one structure with every langseg dataset:

- semantic: ``{"image": 3 x H x W uint8, "mask": H x W int64 class map (255 = ignore),
  "labels": class names, "meta": {...}}``;
- referring: ``{"image": 3 x H x W uint8, "mask": H x W bool, "text": str, "meta": {...}}``.

On-disk layout written by :func:`write_shapeworld` (and ``langseg data shapes``), see docs/shapeworld.md::

    OUT/world.json                 format, version, seed, count, config, label names per granularity
    OUT/images/000000.png          RGB image
    OUT/instances/000000.png       8-bit: 0 background, k + 1 for object k (visible pixels)
    OUT/semantic/000000.png        8-bit class map under world.json's "granularity"
    OUT/annotations/000000.json    objects (attributes, centre, radius, area) and expressions
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from langseg.atomic import TEMP_PREFIX, write_folder
from langseg.data.annotations import entry_field, read_json, short
from langseg.data.shape_expressions import HARD_KINDS, Expression, referring_expressions
from langseg.data.shapes import (
    GRANULARITIES,
    MAX_SIZE,
    Granularity,
    Scene,
    ShapeWorldConfig,
    has_twin,
    label_names,
    render_scene,
)
from langseg.errors import BadConfigError, BadDataError, OutputError

FORMAT = "langseg-shapeworld"
FORMAT_VERSION = 1
Sample = dict[str, Any]
# Bounds of dataset settings: a typo such as num_scenes: 1e12 would otherwise allocate a sampler index of
# terabytes (and ShapeWorld-Ref renders every scene once to index its expressions).
MAX_SCENES = 10_000_000
MAX_SEED = 2**63 - 1
MAX_PER_OBJECT = 64


def _check_world_args(num_scenes: Any, seed: Any, per_object: Any = 1) -> None:
    """BadConfigError naming the first of ``num_scenes``, ``seed``, ``per_object`` out of range."""
    for name, value, low, high in (
        ("num_scenes", num_scenes, 0, MAX_SCENES),
        ("seed", seed, 0, MAX_SEED),
        ("per_object", per_object, 1, MAX_PER_OBJECT),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise BadConfigError(
                f"ShapeWorld setting {name!r} must be an integer in [{low}, {high}], got {short(value)}",
                hint="Fix data.kwargs (or --data-arg / --num / --seed).",
            )


def expression_rng(seed: int, index: int) -> np.random.Generator:
    """Generator for choosing scene ``index``'s expressions, independent of the rendering stream."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, index, 1])))


def scene_expressions(scene: Scene, per_object: int = 3, hard: bool = False) -> list[Expression]:
    """The expressions ShapeWorld-Ref uses for ``scene`` (deterministic per seed and index).

    ``hard``: only position and relation expressions about objects that share colour and shape with
    another object of the scene (the hard split; its scenes come from a ``twins`` world).
    """
    rng = expression_rng(scene.seed, scene.index)
    if not hard:
        return referring_expressions(scene, rng, per_object)
    targets = {o.index for o in scene.objects if has_twin(o, scene.objects)}
    return referring_expressions(scene, rng, per_object, HARD_KINDS, targets)


def _image_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


class _Variety:
    """Scenes of one world drawn over several backgrounds and at several sizes, then brought to one size.

    Scene ``i`` takes background ``backgrounds[i % B]`` and is rendered at ``render_sizes[(i // B) % R]``
    pixels, then resized to ``config.size`` the way a predictor shrinks an image (bicubic, antialiased:
    the VLT letterbox of a square image); its mask goes with it (semantic: nearest; referring: the
    pixels at least half covered). So a model trained at one input size also sees what a user's larger
    renders look like once shrunk (smoother edges, averaged noise). ``None`` keeps the config's.
    """

    def __init__(
        self, config: ShapeWorldConfig, backgrounds: Sequence[str] | None, render_sizes: Sequence[int] | None
    ) -> None:
        self.config = config
        self.backgrounds = tuple(backgrounds or (config.background,))
        self.render_sizes = tuple(render_sizes or (config.size,))
        for background in self.backgrounds:  # validated by the config itself
            replace(config, background=background)  # type: ignore[arg-type]
        if any(
            isinstance(s, bool) or not isinstance(s, int) or not 32 <= s <= MAX_SIZE
            for s in self.render_sizes
        ):
            raise BadConfigError(
                f"render_sizes must be integers from 32 to {MAX_SIZE}, got {short(list(self.render_sizes))}"
            )

    def scene(self, seed: int, index: int) -> Scene:
        count = len(self.backgrounds)
        config = replace(
            self.config,
            background=self.backgrounds[index % count],  # type: ignore[arg-type]
            size=self.render_sizes[(index // count) % len(self.render_sizes)],
        )
        return render_scene(seed, index, config)

    def fit(self, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``3 x S x S`` uint8 image and ``S x S`` mask at ``config.size`` from a render of another size."""
        pixels, target = _image_tensor(image), torch.from_numpy(mask)
        size = (self.config.size, self.config.size)
        if tuple(target.shape) == size:
            return pixels, target
        resized = F.interpolate(
            pixels[None].float(), size=size, mode="bicubic", align_corners=False, antialias=True
        )
        pixels = resized[0].round().clamp(0, 255).to(torch.uint8)
        if target.dtype == torch.bool:
            area = F.interpolate(target[None, None].float(), size=size, mode="area")[0, 0]
            return pixels, area >= 0.5
        return pixels, F.interpolate(target[None, None].float(), size=size, mode="nearest")[0, 0].to(
            target.dtype
        )


class ShapeWorldSemantic(Dataset):
    """``num_scenes`` scenes of world ``seed`` with per-pixel class maps under ``granularity``."""

    def __init__(
        self,
        num_scenes: int,
        seed: int = 0,
        config: ShapeWorldConfig | None = None,
        granularity: Granularity = "colour_shape",
        transform: Callable[[Sample], Sample] | None = None,
        backgrounds: Sequence[str] | None = None,
        render_sizes: Sequence[int] | None = None,
    ) -> None:
        _check_world_args(num_scenes, seed)
        self.num_scenes, self.seed = num_scenes, seed
        self.config = config or ShapeWorldConfig()
        self.granularity = granularity
        self.labels = label_names(self.config, granularity)
        self.transform = transform
        self.variety = _Variety(self.config, backgrounds, render_sizes)
        if num_scenes:  # draw one scene now: settings that make scenes impossible fail here, not in a worker
            self.variety.scene(seed, 0)

    def __len__(self) -> int:
        return self.num_scenes

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.num_scenes:
            raise IndexError(index)
        scene = self.variety.scene(self.seed, index)
        image, mask = self.variety.fit(scene.image, scene.semantic_map(self.granularity))
        sample = {
            "image": image,
            "mask": mask,
            "labels": self.labels,
            "meta": {"seed": self.seed, "index": index},
        }
        return self.transform(sample) if self.transform else sample


class ShapeWorldReferring(Dataset):
    """One sample per (scene, expression) over ``num_scenes`` scenes of world ``seed``.

    The (scene, expression) index is built on first use by rendering each scene once; images are
    re-rendered per item rather than cached, which is cheaper than holding them in memory.

    ``hard=True`` is the split that needs reasoning (docs/shapeworld.md): the world is drawn with
    ``twins`` (every scene holds two objects of the same colour and shape) and the only expressions are
    position and relation ones about objects that have such a twin.
    """

    def __init__(
        self,
        num_scenes: int,
        seed: int = 0,
        config: ShapeWorldConfig | None = None,
        per_object: int = 3,
        transform: Callable[[Sample], Sample] | None = None,
        backgrounds: Sequence[str] | None = None,
        render_sizes: Sequence[int] | None = None,
        hard: bool = False,
    ) -> None:
        _check_world_args(num_scenes, seed, per_object)
        if not isinstance(hard, bool):
            raise BadConfigError(f"ShapeWorld setting 'hard' must be true or false, got {short(hard)}")
        self.num_scenes, self.seed, self.per_object, self.hard = num_scenes, seed, per_object, hard
        self.config = config or ShapeWorldConfig()
        if hard:
            self.config = replace(self.config, twins=True)
        self.transform = transform
        self.variety = _Variety(self.config, backgrounds, render_sizes)
        self._index: list[tuple[int, Expression]] | None = None

    @property
    def index(self) -> list[tuple[int, Expression]]:
        if self._index is None:
            self._index = [
                (i, expr)
                for i in range(self.num_scenes)
                for expr in scene_expressions(self.variety.scene(self.seed, i), self.per_object, self.hard)
            ]
        return self._index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> Sample:
        scene_index, expr = self.index[item]
        scene = self.variety.scene(self.seed, scene_index)
        image, mask = self.variety.fit(scene.image, scene.object_mask(expr.target))
        sample = {
            "image": image,
            "mask": mask,
            "text": expr.text,
            "meta": {"seed": self.seed, "index": scene_index, "target": expr.target, "kind": expr.kind},
        }
        return self.transform(sample) if self.transform else sample


def _config_json(config: ShapeWorldConfig) -> dict[str, Any]:
    """``config`` as world.json stores it: ``twins`` only when set, so that default worlds are written
    byte for byte as before the setting existed (and stay readable by earlier versions)."""
    data = asdict(config)
    if not config.twins:
        del data["twins"]
    return data


def _config_from_json(data: dict, where: str = "world.json") -> ShapeWorldConfig:
    """The :class:`ShapeWorldConfig` saved in a world.json; BadDataError (naming ``where``) if malformed."""
    try:
        data = dict(data)
        for key in ("shapes", "colours"):
            data[key] = tuple(data[key])
        data["exclude_pairs"] = tuple(tuple(p) for p in data.get("exclude_pairs", ()))
        return ShapeWorldConfig(**data)
    except (BadConfigError, KeyError, TypeError, ValueError) as err:
        raise BadDataError(
            f"{where}: 'config' is not a ShapeWorld config ({short(str(err), 100)})",
            hint="Re-write the world with `langseg data shapes`.",
        ) from None


def write_shapeworld(
    out_dir: str | Path,
    num_scenes: int,
    seed: int = 0,
    config: ShapeWorldConfig | None = None,
    granularity: Granularity = "colour_shape",
    per_object: int = 3,
    overwrite: bool = False,
    on_scene: Callable[[int], None] | None = None,
) -> Path:
    """Write ``num_scenes`` scenes to ``out_dir`` in the documented layout; returns the folder.

    Refuses a non-empty folder unless ``overwrite``, so that an existing world or unrelated files are
    never clobbered. ``on_scene(i)`` is called after each scene (progress bars).
    """
    if num_scenes < 0:
        raise BadConfigError(f"--num must be zero or more, got {num_scenes}")
    _check_world_args(num_scenes, seed, per_object)
    if granularity not in GRANULARITIES:
        raise BadConfigError(
            f"unknown granularity {granularity!r}", hint=f"Use one of {', '.join(GRANULARITIES)}."
        )
    config = config or ShapeWorldConfig()
    out = Path(out_dir)
    target = _check_world_folder(out, overwrite)

    # The world is written whole into a temporary sibling folder and then put in place, so that an
    # interrupted write never leaves a world that mixes old and new scenes (or keeps old extra ones).
    def write(tmp: Path) -> None:
        for sub in WORLD_NAMES[1:]:
            (tmp / sub).mkdir(parents=True)
        world = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "seed": seed,
            "num_scenes": num_scenes,
            "granularity": granularity,
            "per_object": per_object,
            "config": _config_json(config),
            "labels": {g: label_names(config, g) for g in GRANULARITIES},
        }
        for i in range(num_scenes):
            scene = render_scene(seed, i, config)
            stem = f"{i:06d}"
            Image.fromarray(scene.image).save(tmp / "images" / f"{stem}.png")
            Image.fromarray(scene.instances).save(tmp / "instances" / f"{stem}.png")
            Image.fromarray(scene.semantic_map(granularity).astype(np.uint8)).save(
                tmp / "semantic" / f"{stem}.png"
            )
            annotation = {
                "seed": seed,
                "index": i,
                "objects": [o.to_json() for o in scene.objects],
                "expressions": [e.to_json() for e in scene_expressions(scene, per_object)],
            }
            (tmp / "annotations" / f"{stem}.json").write_text(json.dumps(annotation, indent=1))
            if on_scene:
                on_scene(i)
        # world.json last: a folder without it is an interrupted write, never mistaken for a world.
        (tmp / "world.json").write_text(json.dumps(world, indent=2))

    try:
        write_folder(target, write, last=WORLD_NAMES[0])  # world.json, written last, marks it complete
    except OSError as err:
        raise OutputError(f"cannot write ShapeWorld to {out}: {err.strerror or err}") from err
    return out


WORLD_NAMES = ("world.json", "images", "instances", "semantic", "annotations")


def _check_world_folder(out: Path, overwrite: bool) -> Path:
    """``out`` resolved, if :func:`write_shapeworld` may write there; else an :class:`OutputError`.

    A new or empty folder is fine; a non-empty one needs ``overwrite`` and may then hold only a world
    (:data:`WORLD_NAMES`): the whole folder is replaced, so nothing langseg did not write is deleted.
    """
    try:
        existing = out
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if existing == out and not out.is_dir():
            raise OutputError(f"{out} exists and is not a folder", hint="Choose a new folder for --out.")
        if not existing.is_dir():
            hint = "Choose a new folder for --out."
            raise OutputError(f"cannot write into {out}: {existing} is a file", hint=hint)
        names = sorted(os.listdir(out)) if existing == out else []
        target = out.resolve()
        cwd = Path.cwd().resolve()
    except OSError as err:
        if isinstance(err, OutputError):
            raise
        hint = "Choose a folder with a shorter path that you may write to."
        raise OutputError(f"cannot write into {out}: {err.strerror or err}", hint=hint) from err
    if names and not overwrite:
        raise OutputError(
            f"{out} is not empty",
            hint="Choose an empty or new folder, or pass --overwrite to replace the world in it.",
        )
    foreign = [n for n in names if n not in WORLD_NAMES and not n.startswith(TEMP_PREFIX)]
    if foreign:
        raise OutputError(
            f"{out} holds files that are not part of a ShapeWorld: {', '.join(foreign[:3])}",
            hint="--overwrite replaces a world folder only: choose a new or empty folder.",
        )
    if target == target.parent or (names and (cwd == target or target in cwd.parents)):
        raise OutputError(
            f"cannot replace {out}: it is the current folder or the root", hint="Use another --out."
        )
    return target


class ShapeWorldFolder(Dataset):
    """A world written by :func:`write_shapeworld`, read back as a semantic or referring dataset."""

    def __init__(
        self,
        root: str | Path,
        task: str = "semantic",
        transform: Callable[[Sample], Sample] | None = None,
    ) -> None:
        self.root = Path(root)
        world_file = self.root / "world.json"
        if not world_file.is_file():
            raise BadDataError(
                f"{world_file} not found: {self.root} is not a ShapeWorld folder (or was not fully written)",
                hint="Write one with `langseg data shapes --out DIR --num N`.",
            )
        if task not in ("semantic", "referring"):
            raise BadConfigError(f"unknown task {short(task)}", hint="Use semantic or referring.")
        hint = "Re-write the world with `langseg data shapes --out DIR --num N`."
        world = read_json(world_file, "ShapeWorld file", hint)
        if world.get("format") != FORMAT:
            raise BadDataError(
                f"{world_file} is not a {FORMAT} file (its 'format' is not {FORMAT!r})", hint=hint
            )
        self.task, self.transform = task, transform
        where = str(world_file)
        self.config = _config_from_json(entry_field(world, "config", dict, where, hint), where)
        self.granularity = entry_field(world, "granularity", str, where, hint)
        labels = entry_field(world, "labels", dict, where, hint).get(self.granularity)
        if not isinstance(labels, list) or not labels or not all(isinstance(n, str) for n in labels):
            raise BadDataError(f"{where}: 'labels' has no list of names for {self.granularity!r}", hint=hint)
        self.labels: list[str] = labels
        num_scenes = entry_field(world, "num_scenes", int, where, hint)
        if not 0 <= num_scenes <= MAX_SCENES:
            raise BadDataError(
                f"{where}: 'num_scenes' must be 0 to {MAX_SCENES}, got {num_scenes}", hint=hint
            )
        self.stems = [f"{i:06d}" for i in range(num_scenes)]
        self.items: list[tuple[str, dict | None]] = [(stem, None) for stem in self.stems]
        if task == "referring":
            self.items = [(stem, expr) for stem in self.stems for expr in self._expressions(stem, hint)]

    def _expressions(self, stem: str, hint: str) -> list[dict]:
        """The checked ``expressions`` of ``annotations/STEM.json`` (text, target object, kind)."""
        path = self.root / "annotations" / f"{stem}.json"
        expressions = entry_field(
            read_json(path, "ShapeWorld annotation", hint), "expressions", list, str(path)
        )
        for i, expr in enumerate(expressions):
            where = f"{path}: expressions[{i}]"
            entry_field(expr, "text", str, where, hint)
            entry_field(expr, "kind", str, where, hint)
            if not 0 <= entry_field(expr, "target", int, where, hint) < 255:
                raise BadDataError(f"{where}: 'target' must be an object index 0 to 254", hint=hint)
        return expressions

    def __len__(self) -> int:
        return len(self.items)

    def _read(self, sub: str, stem: str) -> np.ndarray:
        path = self.root / sub / f"{stem}.png"
        if not path.is_file():
            raise BadDataError(f"missing file {path}", hint="Re-write the world with `langseg data shapes`.")
        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB") if sub == "images" else image)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise BadDataError(
                f"cannot read {path}: {err}", hint="Re-write the world with `langseg data shapes`."
            ) from None
        if array.ndim != (3 if sub == "images" else 2):
            raise BadDataError(f"{path} is not a {'RGB image' if sub == 'images' else 'label map'}")
        return array

    def __getitem__(self, item: int) -> Sample:
        stem, expr = self.items[item]
        image = _image_tensor(self._read("images", stem))
        meta: dict[str, Any] = {"stem": stem, "index": int(stem)}
        if expr is None:
            mask = torch.from_numpy(self._read("semantic", stem).astype(np.int64))
            sample = {"image": image, "mask": mask, "labels": self.labels, "meta": meta}
        else:
            mask = torch.from_numpy(self._read("instances", stem) == expr["target"] + 1)
            meta.update(target=expr["target"], kind=expr["kind"])
            sample = {"image": image, "mask": mask, "text": expr["text"], "meta": meta}
        return self.transform(sample) if self.transform else sample
