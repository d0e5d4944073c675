"""Turn whatever a user passes as an image into an ``H x W x 3`` uint8 RGB array.

Accepted: a path (str or PathLike), the bytes of an image file (e.g. an upload), a PIL image of any mode,
a numpy array (``H x W``, ``H x W x 1/3/4``; bool, unsigned or signed integers in 0..65535, or float in
[0, 1]) or a torch tensor (``C x H x W`` with C in 1/3/4, or ``H x W``; of those types, any layout: sparse
and quantized tensors are densified, on any device with data). File images are rotated upright by their
EXIF orientation. Grayscale is repeated to three channels, 16-bit images are scaled to 8 bits,
CMYK/YCbCr/LAB/HSV are converted by PIL, and transparent images are composited over white (transparent
pixels often hold arbitrary colours).

Everything else is a :class:`~langseg.errors.BadImageError` that names the file or the object: a missing,
unreadable (permissions), too long or non-regular path, a folder, an empty, non-image, truncated or
corrupt file (also a lazily opened PIL image that fails to decode), an image over PIL's decompression-bomb
limit (``PIL.Image.MAX_IMAGE_PIXELS``, kept as PIL sets it), NaN/inf or out-of-range pixels, complex,
nested or meta-device tensors, and shapes that are not an image.
"""

from __future__ import annotations

import errno
import io
import os
import re
import stat
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

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
    """``H x W x 3`` uint8 RGB array from a path, image file bytes, PIL image, array or tensor (see module
    docstring).

    Raises:
        BadImageError: the file is missing, unreadable, not an image, truncated or over PIL's
            decompression-bomb limit; or the object has a shape, mode or pixel type that is not an image.
    """
    if isinstance(source, (str, os.PathLike)):
        if isinstance(source, str) and not source.strip():
            raise BadImageError("the image path is empty", hint="Pass the path of an image file.")
        try:
            path = Path(source)
        except TypeError as err:  # a PathLike whose __fspath__ returns bytes
            raise BadImageError(f"cannot read an image from {source!r}: {err}") from err
        return _from_pil(_upright(_open(path)), str(path))
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _from_pil(_upright(_open_bytes(bytes(source))), "the image data")
    if isinstance(source, Image.Image):
        return _from_pil(source, "the PIL image")
    if isinstance(source, torch.Tensor):
        return _from_array(_tensor_to_hwc(source))
    if isinstance(source, np.ndarray):
        return _from_array(np.asarray(source))  # a plain ndarray: np.matrix and masked arrays misbehave
    raise BadImageError(f"cannot read an image from a {type(source).__name__}")


def _upright(image: Image.Image) -> Image.Image:
    """``image`` rotated upright by its EXIF orientation."""
    try:
        return ImageOps.exif_transpose(image) or image
    except Exception:  # malformed EXIF is metadata: keep the pixels as stored
        return image


def _short(path: Path) -> str:
    """``path`` for a message: long ones are cut in the middle."""
    text = str(path)
    return text if len(text) <= 200 else f"{text[:90]}...{text[-90:]} ({len(text)} characters)"


def _open(path: Path) -> Image.Image:
    """The image file at ``path``, decoded; every way it can fail is a :class:`BadImageError`."""
    try:
        info = path.stat()
    except (FileNotFoundError, NotADirectoryError) as err:
        raise BadImageError(
            f"image file not found: {_short(path)}", hint="Check the path (and the working directory)."
        ) from err
    except PermissionError as err:
        raise BadImageError(
            f"cannot read {_short(path)}: permission denied",
            hint="Check the permissions of the file and of every folder above it.",
        ) from err
    except OSError as err:
        if err.errno == errno.ENAMETOOLONG:
            raise BadImageError(
                f"the image path is longer than the file system allows: {_short(path)}",
                hint="Move or rename the image so that its path (and each name in it) is shorter.",
            ) from err
        raise BadImageError(f"cannot read {_short(path)}: {err.strerror or err}") from err
    except ValueError as err:  # an embedded NUL character
        raise BadImageError(f"the image path {str(path)[:200]!r} is not a valid path ({err})") from err
    if stat.S_ISDIR(info.st_mode):
        raise BadImageError(
            f"{_short(path)} is a folder, not an image file",
            hint="Pass an image file (the `langseg segment` / `refer` commands also take folders).",
        )
    if not stat.S_ISREG(info.st_mode):  # a FIFO or a device would block or never end
        raise BadImageError(f"{_short(path)} is not a regular file", hint="Pass an image file.")
    if info.st_size == 0:
        raise BadImageError(
            f"{_short(path)} is an empty file (0 bytes)", hint="Check how the file was written."
        )
    try:
        image = _open_header(path)
        image.load()
    except BadImageError:
        raise
    except PermissionError as err:
        raise BadImageError(
            f"cannot read {_short(path)}: permission denied",
            hint="Check the permissions of the file and of every folder above it.",
        ) from err
    except Exception as err:  # decoders fail in many ways on bad bytes; all mean a bad file
        raise BadImageError(
            f"{_short(path)} is not a readable image ({type(err).__name__}: {err})",
            hint="The file is not an image, or it is truncated or corrupt: re-save or re-download it.",
        ) from err
    return image


# Image.open's decompression-bomb warning is made an error under this lock: warning filters are
# process-wide, and batches open images in several threads.
_BOMB_LOCK = threading.Lock()


def _open_header(path: Path | io.BytesIO, what: str | None = None) -> Image.Image:
    """``Image.open(path)`` (the header only), refusing images over PIL's pixel limit."""
    what = what or _short(path)  # type: ignore[arg-type]
    with _BOMB_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            found = re.search(r"\((\d+) pixels\)", str(err))  # PIL names the size only in its message
            raise _bomb_error(what, f"{int(found[1]):,} pixels" if found else "too many pixels") from err
    _check_pixels(image, what)
    return image


def _open_bytes(data: bytes) -> Image.Image:
    """The image file held in ``data`` (e.g. an upload), decoded; failures are :class:`BadImageError`."""
    what = "the image data"
    if not data:
        raise BadImageError(f"{what} is empty (0 bytes)", hint="Send the bytes of an image file.")
    try:
        image = _open_header(io.BytesIO(data), what)
        image.load()
    except BadImageError:
        raise
    except Exception as err:  # decoders fail in many ways on bad bytes; all mean a bad file
        why = "no image format PIL knows" if isinstance(err, UnidentifiedImageError) else err
        raise BadImageError(
            f"{what} is not a readable image ({type(err).__name__}: {why})",
            hint="Send a PNG, JPEG, WebP, BMP, GIF or TIFF file, whole (not truncated).",
        ) from err
    return image


def _bomb_error(what: str, size: str) -> BadImageError:
    """The error for an image over PIL's decompression-bomb limit; ``size`` says how big it is."""
    limit = Image.MAX_IMAGE_PIXELS
    return BadImageError(
        f"{what} is too large to decode safely ({size}, over PIL's limit of {limit or 0:,} pixels)",
        hint=f"The image has {size}; PIL refuses images over {limit or 0:,} pixels "
        "(PIL.Image.MAX_IMAGE_PIXELS) as possible decompression bombs. Resize it below that with a tool "
        "you trust, then pass the smaller image.",
    )


def _check_pixels(image: Image.Image, what: str) -> None:
    """A :class:`BadImageError` when an image decoded from a file has more pixels than PIL allows."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None or not isinstance(image, ImageFile.ImageFile):
        return  # the user lifted the limit, or the image was made in memory (not decompressed)
    pixels = image.width * image.height
    if pixels > limit:
        raise _bomb_error(what, f"{image.width} x {image.height} = {pixels:,} pixels")


def _from_pil(image: Image.Image, what: str) -> np.ndarray:
    """``H x W x 3`` uint8 from a PIL image of any mode; a lazily opened one is decoded here."""
    _check_pixels(image, what)
    try:
        image.load()  # an Image.open()ed file is decoded only now: a truncated one fails here
    except Exception as err:  # decoders fail in many ways on bad bytes
        raise BadImageError(
            f"{what} cannot be decoded ({type(err).__name__}: {err})",
            hint="The file is truncated or corrupt: re-save or re-download it.",
        ) from err
    if image.width == 0 or image.height == 0:
        raise BadImageError(f"the image is empty ({image.width}x{image.height})")
    mode = image.mode
    try:
        if mode == "RGB" or mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            array = np.asarray(image)
        else:
            if (mode == "P" and "transparency" in image.info) or mode == "La":
                image = image.convert("RGBA" if mode == "P" else "LA")  # PIL has no La -> RGBA
            if image.mode in ("RGBA", "LA", "PA", "RGBa"):
                array = np.asarray(image.convert("RGBA"))
            else:
                array = np.asarray(image.convert("RGB"))  # a writable copy, as for the other modes
    except Exception as err:  # PIL's converters raise ValueError, OSError, ...
        raise BadImageError(f"cannot convert an image of mode {mode!r} to RGB ({err})") from err
    return _from_array(array)


def _tensor_to_hwc(tensor: torch.Tensor) -> np.ndarray:
    """A ``C x H x W`` (or ``H x W``) tensor of any layout, device or dtype as an ``H x W x C`` array."""
    if tensor.is_nested:
        raise BadImageError("a nested tensor is not an image", hint="Pass one C x H x W tensor per image.")
    if tensor.device.type == "meta":
        raise BadImageError(
            "the tensor is on the meta device: it holds no pixel data",
            hint="Pass a tensor with data (on the CPU or a GPU).",
        )
    if tensor.is_complex():
        raise BadImageError(f"unsupported pixel type {tensor.dtype} (complex)")
    shape = tuple(tensor.shape)
    if tensor.layout != torch.strided:  # sparse COO / CSR / CSC / BSR: densified below, so bound it first
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and tensor.numel() > 4 * limit:
            raise BadImageError(
                f"the sparse tensor of shape {shape} is too large to densify ({tensor.numel():,} values)",
                hint=f"Pass images of at most {limit:,} pixels (PIL.Image.MAX_IMAGE_PIXELS).",
            )
    if tensor.ndim == 3 and shape[0] in (1, 3, 4) and shape[-1] in (1, 3, 4):
        raise BadImageError(
            f"ambiguous tensor layout {shape}",
            hint="Pass tensors as C x H x W with C in 1, 3 or 4 (or a numpy array as H x W x C).",
        )
    array = tensor.detach()
    try:
        if array.layout != torch.strided:
            array = array.to_dense()
        if array.is_quantized:
            array = array.dequantize()
        array = array.cpu()
        if array.is_floating_point() and array.dtype not in (torch.float32, torch.float64):
            array = array.float()  # bfloat16, float16 and float8 have no (or no exact) numpy type
        if array.ndim == 3 and shape[0] in (1, 3, 4):
            array = array.permute(1, 2, 0)
        return array.numpy()
    except (TypeError, RuntimeError, NotImplementedError) as err:
        raise BadImageError(f"cannot read pixels from a {tensor.dtype} tensor ({err})") from err


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
