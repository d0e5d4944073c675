"""Turn whatever a user passes as an image into an ``H x W x 3`` uint8 RGB array.

Accepted: a path (str or Path), a PIL image, a numpy array (``H x W``, ``H x W x 1/3/4``; uint8, uint16 or
float in [0, 1]) or a torch tensor (``C x H x W`` with C in 1/3/4, or ``H x W``; uint8 or float in
[0, 1]). File images are rotated upright by their EXIF orientation. Grayscale is repeated to three
channels, 16-bit images are scaled to 8 bits, CMYK/YCbCr/LAB/HSV are converted by PIL, and transparent
images are composited over white (transparent pixels often hold arbitrary colours).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from langseg.errors import BadImageError

ImageInput = Any  # str | Path | PIL.Image.Image | np.ndarray | torch.Tensor

# Pixel normalisation constants (of RGB in [0, 1]), written once for predictors and training.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF_MEAN = HALF_STD = (0.5, 0.5, 0.5)  # LSeg: x / 255 * 2 - 1
UNIT_MEAN, UNIT_STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # no normalisation (VLT's Darknet)


def load_image(source: ImageInput) -> np.ndarray:
    """``H x W x 3`` uint8 RGB array from a path, PIL image, array or tensor (see module docstring)."""
    if isinstance(source, (str, Path)):
        image = _open(Path(source))
        return _from_pil(ImageOps.exif_transpose(image) or image)
    if isinstance(source, Image.Image):
        return _from_pil(source)
    if isinstance(source, torch.Tensor):
        return _from_array(_tensor_to_hwc(source))
    if isinstance(source, np.ndarray):
        return _from_array(source)
    raise BadImageError(f"cannot read an image from a {type(source).__name__}")


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise BadImageError(
            f"image file not found: {path}", hint="Check the path (and the working directory)."
        )
    if path.stat().st_size == 0:
        raise BadImageError(f"{path} is an empty file (0 bytes)", hint="Check how the file was written.")
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise BadImageError(f"{path} is not a readable image ({err})") from err
    return image


def _from_pil(image: Image.Image) -> np.ndarray:
    if image.width == 0 or image.height == 0:
        raise BadImageError(f"the image is empty ({image.width}x{image.height})")
    mode = image.mode
    if mode == "RGB":
        return _from_array(np.asarray(image))
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _from_array(np.asarray(image))
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _from_array(np.asarray(image.convert("RGBA")))
    try:
        return _from_array(np.asarray(image.convert("RGB")))  # a writable copy, as for the other modes
    except (ValueError, OSError) as err:
        raise BadImageError(f"cannot convert an image of mode {mode!r} to RGB") from err


def _tensor_to_hwc(tensor: torch.Tensor) -> np.ndarray:
    array = tensor.detach().cpu()
    if array.dtype == torch.bfloat16 or array.dtype == torch.float16:
        array = array.float()
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.permute(1, 2, 0)
    elif array.ndim == 3 and array.shape[0] in (1, 3, 4):
        raise BadImageError(
            f"ambiguous tensor layout {tuple(array.shape)}",
            hint="Pass tensors as C x H x W with C in 1, 3 or 4 (or a numpy array as H x W x C).",
        )
    return array.numpy()


def _from_array(array: np.ndarray) -> np.ndarray:
    """``H x W x 3`` uint8 from an array of the accepted shapes and dtypes."""
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise BadImageError(f"expected an H x W or H x W x 1/3/4 image, got shape {tuple(array.shape)}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise BadImageError(f"the image is empty (shape {tuple(array.shape)})")
    if array.dtype == np.uint8 and array.shape[-1] == 3:  # already what we want: no float round trip
        # A copy when needed: arrays from PIL are read-only, and callers may hand them to torch.
        return array if array.flags.c_contiguous and array.flags.writeable else np.array(array)
    rgb = _to_float01(array)
    if rgb.shape[-1] == 4:  # composite over white
        alpha = rgb[..., 3:]
        rgb = rgb[..., :3] * alpha + (1.0 - alpha)
    elif rgb.shape[-1] == 1:
        rgb = np.repeat(rgb, 3, axis=-1)
    return np.ascontiguousarray(np.round(rgb * 255.0).astype(np.uint8))


def _to_float01(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.integer):
        # 16-bit files (PIL modes I;16 / I) use the full 0..65535 range; anything above is not an image.
        if array.min() < 0 or array.max() > 65535:
            raise BadImageError(f"integer pixel values outside 0..65535 (range {array.min()}..{array.max()})")
        scale = 255.0 if array.max() <= 255 and array.dtype != np.uint16 else 65535.0
        return array.astype(np.float32) / scale
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise BadImageError("the image contains NaN or infinite values")
        if array.min() < 0.0 or array.max() > 1.0:
            raise BadImageError(
                f"float pixel values must be in [0, 1], got {array.min():.3g}..{array.max():.3g}",
                hint="Divide 0..255 floats by 255, or pass a uint8 array.",
            )
        return array.astype(np.float32)
    raise BadImageError(f"unsupported pixel type {array.dtype}")
