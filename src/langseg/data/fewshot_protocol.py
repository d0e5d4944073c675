"""LSeg's published zero-shot protocol on the few-shot benchmarks, as its code runs it.

LSeg's ``test_lseg_zs.py`` evaluates with HSNet's loaders (``fewshot_data/``, copied from HSNet):

- **Resolution.** ``FSSDataset.initialize(img_size=480, use_original_imgsize=False)``: every query image
  is resized to 480 x 480 (torchvision ``Resize((480, 480))`` on a PIL image: PIL's bilinear filter),
  its mask to 480 x 480 with ``F.interpolate(..., mode="nearest")``, and the prediction (480 x 480, the
  network's output for a 480 x 480 input) is scored against that mask: IoUs count pixels of the squashed
  480 x 480 grid, not of the original image. :func:`resize_square` does the same.
- **Episodes.** A PASCAL-5i or COCO-20i test loader is 1000 episodes long. PASCAL-5i takes episode ``i``
  from its fold list at ``i % len(list)`` (fold 0's 346 pairs: the first 308 are scored three times,
  the rest twice); COCO-20i ignores ``i`` and draws a class, then one of its images, from numpy's global
  generator seeded with 0 (:func:`hsnet_coco_episodes` replays it). FSS-1000 scores every test image
  once (240 classes x 10 = 2400; zero-shot, so image 1 is not set aside as a support).
- **Prompts.** ``["others", name]`` with the names of LSeg's ``label_files/fewshot_*.txt``: VOC's words
  ("diningtable", "pottedplant", "tvmonitor"), COCO's with spaces removed and VOC's words for five
  classes, FSS-1000's folder names verbatim (underscores kept): ``label_style="lseg"``.
- **Scores** (HSNet's ``Evaluator`` and ``AverageMeter``): per class, foreground and background
  intersection and union summed over its episodes (PASCAL's 255 borders ignored); fold mIoU = mean over
  the fold's classes of foreground IoU, FB-IoU = mean of the background and foreground IoUs of the
  sums over every class (:class:`~langseg.metrics.FewShotMetrics`). HSNet averages over the fold's class
  ids, scoring ``0`` for a class never seen; langseg averages over the classes seen, the same for a full
  run (1000 episodes cover every class) and meaningful for a ``--limit`` run.

:data:`LSEG_ZERO_SHOT` holds the settings that turn the dataset classes into this protocol; the
registered names (``pascal-5i``, ``coco-20i``, ``fss1000``) default to them, so ``langseg eval MODEL
--data pascal-5i --fold K`` gives figures comparable to the paper's (given HSNet's split lists). The
classes themselves default to the raw benchmark (original sizes, every pair once, readable names).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from langseg.errors import BadConfigError

__all__ = [
    "HSNET_EPISODES",
    "HSNET_SIZE",
    "LSEG_ZERO_SHOT",
    "Episodes",
    "episode_count",
    "hsnet_coco_episodes",
    "resize_square",
]

HSNET_SIZE = 480
HSNET_EPISODES = 1000
# None: every (image, class) pair once; "hsnet": HSNet's count (1000 test episodes, training pairs once);
# an int: that many episodes.
Episodes = int | Literal["hsnet"] | None
# The dataset settings of the published protocol (FSS-1000 takes all but ``episodes``).
LSEG_ZERO_SHOT: dict[str, Any] = {"label_style": "lseg", "size": HSNET_SIZE, "episodes": "hsnet"}


def check_size(size: int | None) -> None:
    """Raise :class:`BadConfigError` unless ``size`` is a positive int or ``None``."""
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise BadConfigError(
            f"size must be a positive integer or None, got {size!r:.40}",
            hint=f"{HSNET_SIZE} is the published protocol's; None keeps each image's own size.",
        )


def episode_count(episodes: Episodes, kind: str) -> int | None:
    """How many episodes a split of ``kind`` (HSNet's ``trn`` / ``val``) yields; ``None``: every pair once.

    Raises:
        BadConfigError: ``episodes`` is not ``None``, ``"hsnet"`` or a positive int.
    """
    if episodes == "hsnet":
        return HSNET_EPISODES if kind == "val" else None  # HSNet's training loaders use every pair
    if episodes is None:
        return None
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise BadConfigError(
            f"episodes must be a positive integer, 'hsnet' or None, got {episodes!r:.40}",
            hint=f"'hsnet' gives HSNet's {HSNET_EPISODES} test episodes; None every pair once.",
        )
    return episodes


def resize_square(image: torch.Tensor, mask: np.ndarray, size: int) -> tuple[torch.Tensor, np.ndarray]:
    """HSNet's test transform of one query: ``3 x H x W`` uint8 image and ``H x W`` uint8 mask -> ``3 x S x
    S`` and ``S x S`` (``S = size``).

    The image goes through PIL's bilinear resize (what torchvision's ``Resize((S, S))`` does to a PIL
    image: antialiased when shrinking), the mask through torch's ``nearest`` interpolation (as HSNet's
    datasets call it), so the class and the ignore label stay exact values.
    """
    pil = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((size, size), Image.BILINEAR)
    resized = torch.from_numpy(np.array(pil)).permute(2, 0, 1).contiguous()
    grid = F.interpolate(torch.from_numpy(mask)[None, None].float(), size=(size, size), mode="nearest")
    return resized, grid[0, 0].to(torch.uint8).numpy()


def hsnet_coco_episodes(pairs: dict[int, list[str]], count: int, seed: int) -> list[tuple[str, int]]:
    """``count`` (image, class id) episodes drawn as HSNet's COCO-20i loader draws them.

    ``DatasetCOCO.load_frame`` ignores the episode index: ``np.random.choice(class_ids, 1,
    replace=False)``, then ``np.random.choice(images_of_that_class, 1, replace=False)``, from numpy's
    global legacy generator that ``fix_randseed(seed)`` seeded; nothing else draws from it in a zero-shot
    run. A legacy ``RandomState`` replays that stream (``choice(n, 1, replace=False)`` takes
    ``permutation(n)[0]``, whether given ``n`` or a sequence of length ``n``).

    Args:
        pairs: class id -> its images, in the split list's order; classes are taken ascending (HSNet's
            ``class_ids``), skipping any without images (HSNet would fail on them).
        count: episodes to draw.
        seed: the seed (``test_lseg_zs.py``: 0).
    """
    rng = np.random.RandomState(seed)
    usable = [c for c in sorted(pairs) if pairs[c]]
    episodes = []
    for _ in range(count if usable else 0):
        c = usable[int(rng.choice(len(usable), 1, replace=False)[0])]
        episodes.append((pairs[c][int(rng.choice(len(pairs[c]), 1, replace=False)[0])], c))
    return episodes
