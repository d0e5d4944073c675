"""Where LSeg's bf16 argmax flips come from, and what each precision plan costs and saves on CPU.

    python benchmarks/bf16_agreement.py [--scenes 24] [--random-images 3] [--reps 5] [--compile]
                                        [--skip-agreement] [--skip-speed] [--threads N]

**Agreement.** Every precision plan is scored against the float32 network on the same images, through
the public ``Segmenter`` (masks at the image's own size):

- ``lseg-shapes`` (bundled weights, its default plan: 128 px + flip) on held-out ShapeWorld scenes of
  world seed 7 (no recipe trains on it; 64/128/256 px over plain, noise and texture backgrounds):
  argmax agreement with float32, mIoU over the 41 classes against the ground truth, and the mean
  absolute change of the top probability (what ``background_threshold`` reads);
- ``lseg-vitb32-384`` with random weights (official layout; seed 0), one pass at 384 x 384 over ShapeWorld
  scenes and 8 labels, without and with the spatial regularisation blocks (bottleneck or depthwise, depth
  2): random
  weights give tiny logit margins, so this is the harshest case; there is no ground truth.

Plans: ``.to(bf16)`` casts every weight, the logit scale included (langseg before issue 15); the others
go through ``LSegNet.set_precision(dtype, float32_parts)``, which keeps the normalisation, the dot
product, the logit scale and the spatial regularisation in float32; ``scoring only`` is the float32
network with only the scoring in bf16.

**Speed.** One image-network pass (``encode_image`` + ``classify``, 8 labels) at each model's default size,
every variant once per repetition in turn (interleaved, so load changes hit all alike); the medians and
their ratio to float32. Variants: the weight dtype, channels-last memory format, timm's SDPA attention
switched off (it is on by default), ``torch.autocast`` on float32 weights, and ``torch.compile``
(``--compile``; its compile time is printed). The load average is printed before and after.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

import langseg
from langseg.data import ShapeWorldConfig, label_names, render_scene
from langseg.models.lseg import TEXT_ENCODER_CONFIGS, LSeg, LSegNet
from langseg.models.text import ClipTextEncoder
from langseg.predict import InferencePlan, Segmenter
from langseg.zoo.lseg import LSegOptions, lseg_segmenter

BF16, FP16 = torch.bfloat16, torch.float16
SEED = 7  # a world seed no ShapeWorld recipe trains or validates on
BACKGROUNDS = ("plain", "noise", "texture")
RANDOM_LABELS = ["cat", "grass", "sky", "wooden table", "red circle", "blue square", "person", "other"]


@dataclass(frozen=True)
class Plan:
    """A precision plan: how to turn the float32 network into the one measured."""

    name: str
    apply: Callable[[LSegNet], LSegNet]


def _scoring_only(net: LSegNet) -> LSegNet:
    """The float32 network with only the scoring (normalisation, dot product, logit scale, spatial
    regularisation) in bf16: its dtype follows the logit scale's."""
    net.logit_scale.data = net.logit_scale.data.to(BF16)
    if net.spatial_reg is not None:
        net.spatial_reg.to(BF16)
    return net


PLANS = (
    Plan("float32", lambda net: net),
    Plan(".to(bf16): every weight, scoring too (before)", lambda net: net.to(BF16)),
    Plan("bf16 scoring only (fp32 network)", _scoring_only),
    Plan(
        "bf16 ViT; fp32 DPT, head, scoring",
        lambda n: n.set_precision(BF16, ("reassemble", "decoder", "head")),
    ),
    Plan("bf16 DPT; fp32 ViT, head, scoring", lambda n: n.set_precision(BF16, ("encoder", "head"))),
    Plan("bf16 ViT + DPT; fp32 head, scoring", lambda n: n.set_precision(BF16, ("head",))),
    Plan("bf16 ViT + DPT + head; fp32 scoring (chosen)", lambda n: n.set_precision(BF16)),
    Plan("fp16 ViT + DPT + head; fp32 scoring", lambda n: n.set_precision(FP16)),
)


def shapes_scenes(per_background: int) -> list:
    """Held-out ShapeWorld scenes: ``per_background`` per background, sizes cycling 64/128/256 px."""
    return [
        render_scene(SEED, index, ShapeWorldConfig(size=(64, 128, 256)[index % 3], background=background))  # type: ignore[arg-type]
        for background in BACKGROUNDS
        for index in range(per_background)
    ]


def miou(masks: list[np.ndarray], truths: list[np.ndarray], num_classes: int) -> float:
    """Dataset mIoU: per-class intersections and unions summed over the images, classes present only."""
    inter, union = np.zeros(num_classes), np.zeros(num_classes)
    for mask, truth in zip(masks, truths, strict=True):
        for k in np.union1d(np.unique(mask), np.unique(truth)):
            inter[k] += np.logical_and(mask == k, truth == k).sum()
            union[k] += np.logical_or(mask == k, truth == k).sum()
    return float(np.mean(inter[union > 0] / union[union > 0]))


def run_plan(seg: Segmenter, net: LSegNet, images: list[np.ndarray], labels: list[str]) -> tuple[list, list]:
    """(masks, top probabilities) of ``seg`` with its image network replaced by ``net``."""
    seg.model.net = net
    masks, tops = [], []
    for image in images:
        result = seg.segment(image, labels, keep_scores=True)
        assert result.scores is not None
        masks.append(result.mask)
        tops.append(result.scores.max(0))
    return masks, tops


def agreement_rows(
    name: str, seg: Segmenter, images: list, labels: list[str], truths: list | None
) -> list[list[str]]:
    """One table row per plan for one model: agreement with float32, mIoU (with ``truths``), |dp|."""
    net32 = seg.model.net
    ref_masks, ref_tops = run_plan(seg, net32, images, labels)
    ref_miou = miou(ref_masks, truths, len(labels)) if truths else None
    rows = []
    for plan in PLANS:
        masks, tops = run_plan(seg, plan.apply(copy.deepcopy(net32)), images, labels)
        same = sum(int((m == r).sum()) for m, r in zip(masks, ref_masks, strict=True))
        agree = 100 * same / sum(m.size for m in masks)
        dprob = np.mean([np.abs(t - r).mean() for t, r in zip(tops, ref_tops, strict=True)])
        if truths and ref_miou is not None:
            value = miou(masks, truths, len(labels))
            score = f"{value:.4f} ({100 * (value - ref_miou):+.2f})"
        else:
            score = "-"
        rows.append([name, plan.name, f"{agree:.3f}", score, f"{dprob:.5f}"])
        print(" | ".join(rows[-1]), flush=True)
    seg.model.net = net32
    return rows


def random_segmenter(spatial_reg: str = "none") -> Segmenter:
    """A random-weight (seed 0) ViT-B/32-384 LSeg in the official layout, one pass at the image size."""
    torch.manual_seed(0)
    kwargs = {} if spatial_reg == "none" else {"spatial_reg": spatial_reg, "spatial_reg_depth": 2}
    net = langseg.create_model("lseg-vitb32-384", pretrained=False, **kwargs)
    text = ClipTextEncoder(**TEXT_ENCODER_CONFIGS["lseg-vitb32-384"])
    return lseg_segmenter(LSeg(net, text), options=LSegOptions(plan=InferencePlan()))


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    """A Markdown table (pastes into docs/)."""
    print(f"\n{title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def agreement(args: argparse.Namespace) -> None:
    """The agreement table over both models and every plan."""
    rows = []
    seg = langseg.load("lseg-shapes")
    scenes = shapes_scenes(args.scenes)
    labels = label_names(ShapeWorldConfig(), "colour_shape")
    truths = [scene.semantic_map("colour_shape") for scene in scenes]
    rows += agreement_rows("lseg-shapes", seg, [s.image for s in scenes], labels, truths)
    images = [
        render_scene(SEED, i, ShapeWorldConfig(size=384, background=BACKGROUNDS[i % 3])).image  # type: ignore[arg-type]
        for i in range(args.random_images)
    ]
    for spatial_reg in ("none", "bottleneck", "depthwise"):
        name = "random vitb32-384" + ("" if spatial_reg == "none" else f" + {spatial_reg} x2")
        rows += agreement_rows(name, random_segmenter(spatial_reg), images, RANDOM_LABELS, None)
    title = (
        f"argmax agreement with float32 ({3 * args.scenes} lseg-shapes scenes of world seed {SEED}; "
        f"{args.random_images} random-weight images at 384 px)"
    )
    header = ["model", "plan", "agreement %", "mIoU (points vs fp32)", "mean abs d top-prob"]
    print_table(title, header, rows)


# --- speed -------------------------------------------------------------------------------------------


def _no_sdpa(net: LSegNet) -> LSegNet:
    """The network with timm's fused attention (``F.scaled_dot_product_attention``) switched off."""
    for block in net.encoder.vit.blocks:
        block.attn.fused_attn = False
    return net


def speed_variants(compile_nets: bool) -> dict[str, tuple[Callable[[LSegNet], LSegNet], str]]:
    """Name -> (how to build the network from float32, how to run it: eager/autocast/compile)."""
    channels_last = torch.channels_last
    variants = {
        "float32": (lambda n: n, "eager"),
        "float32, channels-last DPT (default)": (lambda n: n.use_channels_last(), "eager"),
        "float32 + autocast(bf16)": (lambda n: n, "autocast"),
        ".to(bf16), scoring too (before)": (lambda n: n.to(BF16), "eager"),
        "bf16 ViT only": (lambda n: n.set_precision(BF16, ("reassemble", "decoder", "head")), "eager"),
        "bf16 ViT + DPT, fp32 head": (lambda n: n.set_precision(BF16, ("head",)), "eager"),
        "bf16, fp32 scoring (chosen)": (lambda n: n.set_precision(BF16), "eager"),
        "chosen, channels-last DPT (default)": (lambda n: n.set_precision(BF16).use_channels_last(), "eager"),
        "chosen, all channels-last": (
            lambda n: n.set_precision(BF16).to(memory_format=channels_last),
            "eager",
        ),
        "chosen, SDPA off": (lambda n: _no_sdpa(n.set_precision(BF16)), "eager"),
        "fp16, fp32 scoring": (lambda n: n.set_precision(FP16), "eager"),
    }
    if compile_nets:
        variants["float32, torch.compile"] = (lambda n: n, "compile")
        variants["chosen, torch.compile"] = (lambda n: n.set_precision(BF16).use_channels_last(), "compile")
    return variants


def speed(model: str, size: int, reps: int, compile_nets: bool) -> list[list[str]]:
    """Interleaved timings of every variant at ``size``; rows (variant, median ms, ratio to float32)."""
    torch.manual_seed(0)
    net32 = langseg.create_model(model, pretrained=model == "lseg-shapes").eval()
    image = torch.randn(1, 3, size, size)
    text = torch.nn.functional.normalize(torch.randn(len(RANDOM_LABELS), net32.embed_dim), dim=1)
    runners: dict[str, Callable[[], torch.Tensor]] = {}
    for name, (build, mode) in speed_variants(compile_nets).items():
        net = build(copy.deepcopy(net32))
        encode = net.encode_image
        if mode == "compile":
            encode = torch.compile(net.encode_image, dynamic=False)
        x = (
            image.contiguous(memory_format=torch.channels_last)
            if name.endswith("all channels-last")
            else image
        )

        def run(net: LSegNet = net, encode: Callable = encode, x: torch.Tensor = x, mode: str = mode):
            with torch.inference_mode(), torch.autocast("cpu", BF16, enabled=mode == "autocast"):
                return net.classify(encode(x), text)

        start = time.perf_counter()
        run()  # warm-up: oneDNN kernel selection, or compilation
        if mode == "compile":
            print(f"{model}: {name} compiled in {time.perf_counter() - start:.0f} s", flush=True)
        runners[name] = run
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(reps):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append(1000 * (time.perf_counter() - start))
    base = statistics.median(times["float32"])
    rows = [
        [model, f"{size}x{size}", name, f"{statistics.median(t):.0f}", f"{base / statistics.median(t):.2f}x"]
        for name, t in times.items()
    ]
    for row in rows:
        print(" | ".join(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenes", type=int, default=24, help="lseg-shapes scenes per background")
    parser.add_argument("--random-images", type=int, default=3, help="384 px images for the random model")
    parser.add_argument("--reps", type=int, default=5, help="interleaved speed repetitions")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to build)")
    parser.add_argument("--skip-agreement", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}")
    if not args.skip_agreement:
        agreement(args)
    if not args.skip_speed:
        print(f"\nload average before the speed run: {os.getloadavg()}", flush=True)
        rows = speed("lseg-vitb32-384", 384, args.reps, args.compile)
        rows += speed("lseg-shapes", 128, args.reps, args.compile)
        title = f"one network pass, median of {args.reps} interleaved repetitions"
        print_table(title, ["model", "input", "variant", "ms", "vs float32"], rows)
        print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
