"""langseg's LSeg against the official network code, same random weights, same inputs, one run.

    pip install --no-deps openai-clip      # the official code imports OpenAI's `clip` package
    python benchmarks/lseg_vs_official.py --official PATH/TO/lang-seg [--size 384] [--rounds 7] [--compile]

``--official`` is a checkout of https://github.com/isl-org/lang-seg (MIT licence): its
``modules/models/lseg_net.py`` network is imported from there and run as it is, nothing of it is copied
here. No network is needed: ``clip.load`` is replaced by a randomly initialised OpenAI CLIP ViT-B/32 (on
CUDA the official code gets fp16 CLIP weights, so its text features are cast to fp16 as they would be
there), and timm builds the ViT without pretrained weights. The official state dict then goes through
``langseg convert``'s mapping (:func:`langseg.convert.lseg_official.official_to_langseg`) into langseg's
``lseg-vitb32-384``, so both networks hold the same weights.

Printed: how far langseg's logits are from the official ones and how many argmax pixels agree (the
official scoring multiplies in fp16), then, timed in interleaved rounds (medians; load average printed):

- **image forward**: the official ``forward`` with the label features cached (its text tower patched to
  return them), against langseg's ``encode_image`` + ``dense_logits``, in float32 and with langseg's
  bfloat16 plan (``LSegOptions(dtype="bfloat16")``: bf16 weights, float32 scoring);
- **text, 5 new labels**: the official CLIP text tower (all 77 positions) against langseg's (trimmed at
  the last end-of-text token);
- **new image, 5 new labels**: the official ``forward(x, labelset)`` against langseg's network doing the
  same (text + image + scores), and langseg's ``segment()`` (the predictor: preprocessing, the network,
  upsampling and argmax to the image);
- **new labels, same image**: langseg's ``segment()`` with the image features cached, against the
  official ``forward``, which has no cache and recomputes the image.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from langseg.convert.lseg_official import official_to_langseg
from langseg.models.lseg import LSeg, LSegNet
from langseg.models.text import ClipTextEncoder
from langseg.predict import InferencePlan
from langseg.zoo.lseg import LSegOptions, lseg_segmenter

LABELS = ["cat", "grass", "sky", "wooden table", "other"]


def import_clip() -> types.ModuleType:
    """OpenAI's ``clip`` package, which the official code imports (``pip install --no-deps openai-clip``).

    It still imports ``packaging`` through ``pkg_resources``, which recent setuptools no longer ship:
    a stand-in module holding ``packaging`` is enough for it."""
    import packaging.version

    sys.modules.setdefault("pkg_resources", types.SimpleNamespace(packaging=packaging))  # type: ignore[arg-type]
    try:
        import clip
        import clip.model
    except ImportError as err:
        hint = "the official code needs OpenAI's clip: pip install --no-deps openai-clip"
        raise SystemExit(f"{hint} ({err})") from err
    return clip


def official_network(root: Path, size: int) -> torch.nn.Module:
    """The official ``LSegNet`` (``clip_vitb32_384``, the released training options) with random weights."""
    clip = import_clip()
    import timm

    def random_clip(name: str, device: str = "cpu", jit: bool = False) -> tuple[torch.nn.Module, None]:
        if name != "ViT-B/32":
            raise SystemExit(f"this benchmark builds ViT-B/32 only, the official code asked for {name}")
        model = clip.model.CLIP(512, 224, 12, 768, 32, 77, 49408, 512, 8, 12).float()
        encode = model.encode_text
        model.encode_text = lambda text: encode(text).half()  # what fp16 CLIP weights give on CUDA
        return model, None

    create = timm.create_model
    clip.load = random_clip
    timm.create_model = lambda name, pretrained=False, **kw: create(name, pretrained=False, **kw)
    sys.path.insert(0, str(root))
    from modules.models.lseg_net import LSegNet as OfficialLSegNet

    net = OfficialLSegNet(
        labels=LABELS,
        backbone="clip_vitb32_384",
        features=256,
        arch_option=0,
        block_depth=0,
        activation="lrelu",
    ).eval()
    net.pretrained.model.patch_embed.img_size = (size, size)  # as the official LSegModule sets it
    return net


def langseg_model(official: torch.nn.Module) -> LSeg:
    """langseg's ``lseg-vitb32-384`` holding the official network's weights (langseg convert's mapping)."""
    converted = official_to_langseg(official.state_dict(), variant="lseg-vitb32-384")
    model = LSeg(
        LSegNet(**converted.config["kwargs"]), ClipTextEncoder(**converted.config["text_encoder"]["kwargs"])
    )
    model.load_state_dict(converted.lseg_state())
    return model.eval()


def timed_rounds(calls: dict[str, Callable[[int], object]], rounds: int) -> dict[str, float]:
    """Median milliseconds of each call over ``rounds`` interleaved rounds (one warm-up round first)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(rounds + 1):
        for name, call in calls.items():
            start = time.perf_counter()
            call(round_)
            if round_:
                times[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True, help="a checkout of isl-org/lang-seg")
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--compile", action="store_true", help="add langseg's compile=True float32 network (compiles ~100 s)"
    )
    args = parser.parse_args()
    if not (args.official / "modules" / "models" / "lseg_net.py").is_file():
        raise SystemExit(f"{args.official} holds no modules/models/lseg_net.py: pass a lang-seg checkout")
    official_clip = import_clip()
    load_before = os.getloadavg()
    torch.manual_seed(0)
    official = official_network(args.official, args.size)
    model = langseg_model(official)
    fp32 = lseg_segmenter(model, options=LSegOptions(plan=InferencePlan(), dtype="float32"))
    bf16 = lseg_segmenter(
        langseg_model(official), options=LSegOptions(plan=InferencePlan(), dtype="bfloat16")
    )
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8) for _ in range(args.rounds + 2)]
    inputs = [fp32.prepare(image).input for image in images]  # mean = std = 0.5, as the official transform
    counter = iter(range(1 << 30))

    def new_labels() -> list[str]:
        return [*LABELS[:-1], f"thing {next(counter)}"]  # never seen: no text cache can help

    with torch.inference_mode():
        # Parity on the first input, with the official label set.
        ours = model.dense_logits(model.encode_image(inputs[0]), fp32.label_set(LABELS).embeddings)
        theirs = official(inputs[0], LABELS).float()
        agree = float((ours.argmax(1) == theirs.argmax(1)).float().mean())
        diff = float((ours - theirs).abs().max())
        tokens = official_clip.tokenize(LABELS)
        cached = official.clip_pretrained.encode_text(tokens)
        text_tower = official.clip_pretrained.encode_text
        label_embeddings = fp32.label_set(LABELS).embeddings

        def official_image(i: int) -> object:
            official.clip_pretrained.encode_text = lambda _: cached
            try:
                return official(inputs[i], LABELS)
            finally:
                official.clip_pretrained.encode_text = text_tower

        calls: dict[str, Callable[[int], object]] = {
            "image forward: official fp32": official_image,
            "image forward: langseg fp32": lambda i: model.dense_logits(
                model.encode_image(inputs[i]), label_embeddings
            ),
            "image forward: langseg bf16 plan": lambda i: bf16.model.dense_logits(
                bf16.model.encode_image(inputs[i]), label_embeddings
            ),
            "text, 5 new labels: official": lambda i: text_tower(official_clip.tokenize(new_labels())),
            "text, 5 new labels: langseg": lambda i: fp32.encode_prompts(new_labels()),
            "new image + labels: official fp32": lambda i: official(inputs[i], new_labels()),
            "new image + labels: langseg network fp32": lambda i: model.dense_logits(
                model.encode_image(inputs[i]), fp32.encode_prompts(new_labels())
            ),
            "new image + labels: langseg segment() fp32": lambda i: fp32.segment(images[i], new_labels()),
            "new image + labels: langseg segment() bf16": lambda i: bf16.segment(images[i], new_labels()),
            "same image, new labels: langseg segment() fp32": lambda i: fp32.segment(labels=new_labels()),
        }
        compile_seconds = None
        if args.compile:
            compiled = lseg_segmenter(
                langseg_model(official),
                options=LSegOptions(plan=InferencePlan(), dtype="float32", compile=True),
            )
            start = time.perf_counter()
            compiled.model.encode_image(inputs[0])  # the first call compiles
            compile_seconds = time.perf_counter() - start
            calls["image forward: langseg fp32 compiled"] = lambda i: compiled.model.dense_logits(
                compiled.model.encode_image(inputs[i]), label_embeddings
            )
            calls["new image + labels: langseg segment() fp32 compiled"] = lambda i: compiled.segment(
                images[i], new_labels()
            )
        fp32.set_image(images[-1])
        medians = timed_rounds(calls, args.rounds)

    table = Table("call", "median ms", "official / this", title=f"LSeg ViT-B/32, {args.size} px, 5 labels")
    reference = {
        "image forward": medians["image forward: official fp32"],
        "text, 5 new labels": medians["text, 5 new labels: official"],
        "new image + labels": medians["new image + labels: official fp32"],
        "same image, new labels": medians["new image + labels: official fp32"],
    }
    for name, ms in medians.items():
        table.add_row(name, f"{ms:.0f}", f"{reference[name.split(':')[0]] / ms:.2f}x")
    console = Console(width=110)
    console.print(table)
    console.print(
        f"parity: max |logit difference| {diff:.2e}, argmax agreement {100 * agree:.2f} % "
        "(the official scoring multiplies in fp16)"
    )
    if compile_seconds is not None:
        console.print(f"compile=True: the first call (compiling) took {compile_seconds:.0f} s")
    console.print(
        f"load average before {load_before}, after {os.getloadavg()}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {args.rounds} interleaved rounds after one warm-up round"
    )


if __name__ == "__main__":
    main()
