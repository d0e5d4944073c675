"""Tiny random open_clip models for tests: an architecture registered from a JSON file (as a user's
local config would be) and weights perturbed so that every parameter matters."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch

TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
VISION_CFG = {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8}


def register_tiny_vit(folder: Path, name: str, vision_width: int = 32) -> None:
    """Write ``folder/NAME.json`` (a 2-layer ViT-8 at 32 px, 1-layer text tower, 16-d embeddings) and
    register it with open_clip under ``name``."""
    config = {"embed_dim": 16, "vision_cfg": {**VISION_CFG, "width": vision_width}, "text_cfg": TEXT_CFG}
    (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / f"{name}.json")


def random_state(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict of the registered ``name`` with every weight perturbed (open_clip's default init
    has zero biases and unit norms, which would hide wrong mappings); contiguous, ready to save."""
    torch.manual_seed(seed)
    model = open_clip.create_model(name)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return {k: v.contiguous() for k, v in model.state_dict().items()}
