"""Robustness of image and device inputs (issue 13): every image a user can hand a predictor, and every
device they can name, ends in a correct result or a clean :class:`~langseg.errors.LangsegError`.

Hypothesis generates arrays and tensors of random dtype/shape/content/layout, PIL images of every mode,
image files (whole, truncated or with flipped bytes) and device names; explicit tests pin each example of
the issue. Images go through :func:`load_image` (the one loading path) and, for a share of them, through
the bundled ``lseg-shapes`` Segmenter and ``vlt-shapes`` Referrer (loaded once per module).
"""

from __future__ import annotations

import errno
import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

import langseg
from langseg.api import resolve_device
from langseg.errors import BadConfigError, BadImageError, LangsegError
from langseg.predict.images import load_image
from tests.robust import ROBUST, expect_clean

pytestmark = pytest.mark.usefixtures("one_thread")
MANY = settings(parent=ROBUST, max_examples=40)


def rgb(height: int = 6, width: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def assert_image(out: object, height: int, width: int) -> np.ndarray:
    assert isinstance(out, np.ndarray), out
    assert out.shape == (height, width, 3) and out.dtype == np.uint8
    return out


# ----------------------------------------------------------------------------- numpy arrays

DTYPES = [
    "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
    "float16", "float32", "float64", "bool", "complex64",
]  # fmt: skip
IMAGE_SHAPES = st.tuples(st.integers(1, 7), st.integers(1, 7)).flatmap(
    lambda hw: st.sampled_from([hw, (*hw, 1), (*hw, 2), (*hw, 3), (*hw, 4), (*hw, 5)])
)
ANY_SHAPES = hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=4)


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = draw(st.one_of(IMAGE_SHAPES, IMAGE_SHAPES, ANY_SHAPES))
    if dtype.kind == "f" and draw(st.booleans()):  # mostly valid [0, 1] pixels, sometimes anything
        return draw(hnp.arrays(dtype, shape, elements=st.floats(0, 1, width=dtype.itemsize * 8)))
    return draw(hnp.arrays(dtype, shape))


def is_valid_array(array: np.ndarray) -> bool:
    """Whether :func:`load_image` must accept ``array`` (its documented contract)."""
    shape_ok = array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4))
    if not shape_ok or array.size == 0:
        return False
    if array.dtype.kind == "f":
        return bool(np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1)
    if array.dtype.kind in "iu":
        return bool(array.min() >= 0 and array.max() <= 65535)
    return array.dtype.kind == "b"


@MANY
@given(array=arrays())
def test_generated_arrays_load_or_fail_clean(array: np.ndarray) -> None:
    out = expect_clean("image", load_image, array)
    if isinstance(out, LangsegError):
        assert isinstance(out, BadImageError) and not is_valid_array(array), out.message
        return
    assert is_valid_array(array)
    assert_image(out, *array.shape[:2])
    if array.dtype == np.uint8 and (array.ndim == 2 or array.shape[2] == 1):
        assert (out == array.reshape(*array.shape[:2], 1)).all()  # grey repeated, values kept
    elif array.dtype == np.uint8 and array.shape[2] == 3:
        assert (out == array).all()


# ----------------------------------------------------------------------------- torch tensors

FORMS = ["plain", "grad", "non_contiguous", "sparse", "sparse_csr", "quantized", "meta", "complex"]


@st.composite
def tensors(draw: st.DrawFn) -> tuple[str, torch.Tensor, torch.Tensor | None]:
    """(form, tensor, its plain dense twin or None when there is none)."""
    height, width = draw(st.integers(1, 6)), draw(st.integers(5, 8))  # C x H x W never ambiguous
    channels = draw(st.sampled_from([None, 1, 3, 4, 2]))
    shape = (height, width) if channels is None else (channels, height, width)
    form = draw(st.sampled_from(FORMS))
    values = draw(hnp.arrays(np.float32, shape, elements=st.floats(0, 1, width=32)))
    plain = torch.from_numpy(values)
    dtype = draw(st.sampled_from(["float32", "float64", "bfloat16", "float16", "uint8", "int64", "bool"]))
    if dtype == "uint8":
        plain = (plain * 255).to(torch.uint8)
    elif dtype == "bool":
        plain = plain > 0.5
    elif dtype != "float32":
        plain = plain.to(getattr(torch, dtype))
    if draw(st.booleans()) and plain.is_floating_point():
        plain = plain * draw(st.sampled_from([float("nan"), float("inf"), 2.0, -1.0]))  # bad pixels
    if form == "grad" and plain.is_floating_point():
        return form, plain.clone().requires_grad_(), plain
    if form == "non_contiguous":
        wide = torch.zeros(*plain.shape[:-1], plain.shape[-1] * 2, dtype=plain.dtype)
        wide[..., ::2] = plain
        return form, wide[..., ::2], plain
    if form == "sparse":
        return form, plain.to_sparse(), plain
    if form == "sparse_csr" and plain.ndim == 2 and plain.dtype != torch.bool:
        return form, plain.to_sparse_csr(), plain
    if form == "quantized":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch deprecates quantized tensors; users still have them
            unit = plain.float().clamp(0, 1).nan_to_num(0)
            quantized = torch.quantize_per_tensor(unit, 1 / 255, 0, torch.quint8)
        return form, quantized, quantized.dequantize()
    if form == "meta":
        return form, torch.empty(shape, device="meta"), None
    if form == "complex":
        return form, plain.to(torch.complex64), None
    return "plain", plain, plain


@MANY
@given(case=tensors())
def test_generated_tensors_match_their_dense_twin(
    case: tuple[str, torch.Tensor, torch.Tensor | None],
) -> None:
    form, tensor, twin = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's beta/deprecation notes on sparse CSR and quantized tensors
        out = expect_clean("image", load_image, tensor)
    if twin is None:  # meta-device and complex tensors hold no image
        assert isinstance(out, BadImageError), (form, out)
        return
    expected = expect_clean("image", load_image, twin)
    if isinstance(expected, LangsegError):
        assert isinstance(out, BadImageError), (form, out)
    else:
        assert isinstance(out, np.ndarray), (form, out)
        assert np.array_equal(out, expected), form  # every layout gives the dense tensor's pixels


# ----------------------------------------------------------------------------- PIL images

MODES = ["1", "L", "LA", "La", "P", "PA", "I", "I;16", "I;16B", "F", "RGB", "RGBA", "RGBa", "RGBX",
         "CMYK", "YCbCr", "HSV", "LAB"]  # fmt: skip


@st.composite
def pil_images(draw: st.DrawFn) -> Image.Image:
    mode = draw(st.sampled_from(MODES))
    size = (draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    length = len(Image.new(mode, size).tobytes())
    data = draw(st.binary(min_size=length, max_size=length))
    image = Image.frombytes(mode, size, data)
    if mode == "P" and draw(st.booleans()):
        image.info["transparency"] = draw(st.integers(0, 255))
    return image


@MANY
@given(image=pil_images())
def test_generated_pil_images_of_every_mode(image: Image.Image) -> None:
    out = expect_clean("image", load_image, image)
    if isinstance(out, LangsegError):
        # Only 32-bit integer and float modes can hold values that are not pixels.
        assert image.mode in ("I", "F") and isinstance(out, BadImageError), (image.mode, out.message)
        return
    assert_image(out, image.height, image.width)
    if image.mode == "RGB":
        assert np.array_equal(out, np.asarray(image))
    elif image.mode == "L":
        assert np.array_equal(out, np.repeat(np.asarray(image)[..., None], 3, -1))


# ----------------------------------------------------------------------------- image files

FORMATS = {"PNG": ["RGB", "L", "RGBA", "P", "I;16"], "JPEG": ["RGB", "L"], "BMP": ["RGB", "L"],
           "TIFF": ["RGB", "CMYK", "F"], "GIF": ["P", "L"], "WEBP": ["RGB", "RGBA"]}  # fmt: skip


@st.composite
def image_files(draw: st.DrawFn) -> tuple[bytes, bool, Image.Image]:
    """(file bytes, whether they are intact, the saved image)."""
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    mode = draw(st.sampled_from(FORMATS[fmt]))
    size = (draw(st.integers(1, 12)), draw(st.integers(1, 12)))
    image = Image.fromarray(rgb(size[1], size[0], draw(st.integers(0, 99)))).convert(mode)
    data = png_bytes(image, fmt)
    damage = draw(st.sampled_from(["none", "truncate", "flip", "junk"]))
    if damage == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif damage == "flip":
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
    elif damage == "junk":
        data = draw(st.binary(max_size=64))
    return data, damage == "none", image


@MANY
@given(case=image_files(), suffix=st.sampled_from([".png", ".jpg", ".tif", "", ".txt"]))
def test_generated_files_whole_truncated_or_corrupt(
    tmp_path_factory: pytest.TempPathFactory, case: tuple[bytes, bool, Image.Image], suffix: str
) -> None:
    data, intact, image = case
    path = tmp_path_factory.mktemp("f") / f"image{suffix}"
    path.write_bytes(data)
    out = expect_clean("image", load_image, path)
    if intact:
        assert_image(out, image.height, image.width)
    else:
        assert isinstance(out, (np.ndarray, BadImageError)), out
    try:  # the same bytes opened lazily by the user (Image.open reads only the header)
        lazy = Image.open(path)
    except Exception:  # the user's own Image.open refused it: nothing reaches langseg
        return
    with lazy:
        lazy_out = expect_clean("image", load_image, lazy)
    assert isinstance(lazy_out, (np.ndarray, BadImageError)), lazy_out


# ----------------------------------------------------------------------------- through the predictors


@ROBUST
@given(source=st.one_of(arrays(), pil_images(), tensors().map(lambda case: case[1])))
def test_generated_images_through_both_predictors(segmenter, referrer, source) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = expect_clean("image", load_image, source)
        seg = expect_clean("image", segmenter.segment, source, ["red circle", "other"])
        ref = expect_clean("image", referrer.refer_all, source, ["the red circle"])
    if isinstance(loaded, LangsegError):  # every entry point refuses what load_image refuses
        assert isinstance(seg, BadImageError) and isinstance(ref, BadImageError)
    else:
        assert seg.mask.shape == loaded.shape[:2] and ref[0].mask.shape == loaded.shape[:2]


# ----------------------------------------------------------------------------- explicit file cases


def test_decompression_bombs_are_refused_with_size_and_limit(tmp_path: Path, monkeypatch) -> None:
    # PIL warns above MAX_IMAGE_PIXELS and refuses above twice that; a small limit stands in for 89 MP.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    warn_zone, error_zone = tmp_path / "w.png", tmp_path / "e.png"
    Image.new("L", (40, 40)).save(warn_zone)  # 1600 pixels: PIL only warns
    Image.new("L", (50, 50)).save(error_zone)  # 2500 pixels: PIL raises
    filters = list(warnings.filters)
    for path, size in ((warn_zone, "1,600"), (error_zone, "2,500")):
        err = expect_clean("image", load_image, path)
        assert isinstance(err, BadImageError) and "too large" in err.message, err
        assert size in err.hint and "1,000" in err.hint  # the image's size and the limit
        assert "MAX_IMAGE_PIXELS" in err.hint and "Resize" in err.hint and path.name in err.message
    assert warnings.filters == filters  # the error filter was local to the call
    with pytest.warns(Image.DecompressionBombWarning):
        lazy = Image.open(warn_zone)  # the user's own open warns; langseg then refuses it
    err = expect_clean("image", load_image, lazy)
    assert isinstance(err, BadImageError) and "40 x 40" in err.message
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # a limit the user lifted is theirs to lift
    assert_image(load_image(error_zone), 50, 50)


def test_unreadable_folder_and_file(tmp_path: Path, monkeypatch) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    Image.fromarray(rgb()).save(locked / "a.png")
    if os.geteuid() == 0:  # root reads through permissions: make the OS say no
        real_stat = Path.stat

        def denied(self: Path, *args, **kwargs):
            if locked in self.parents:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real_stat(self, *args, **kwargs)

        monkeypatch.setattr(Path, "stat", denied)
        err = expect_clean("image", load_image, locked / "a.png")
        monkeypatch.setattr(Path, "stat", real_stat)
    else:
        locked.chmod(0)
        try:
            err = expect_clean("image", load_image, locked / "a.png")
        finally:
            locked.chmod(0o755)
    assert isinstance(err, BadImageError) and "permission denied" in err.message
    assert "permissions" in err.hint
    # A file whose folder can be listed but which cannot be opened.
    monkeypatch.setattr(Image, "open", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "denied")))
    err = expect_clean("image", load_image, locked / "a.png")
    assert isinstance(err, BadImageError) and "permission denied" in err.message


@pytest.mark.parametrize("kind", ["name", "path"])
def test_paths_longer_than_the_file_system_allows(tmp_path: Path, kind: str) -> None:
    path = tmp_path / ("a" * 300 + ".png") if kind == "name" else Path("/".join(["d" * 200] * 25) + ".png")
    err = expect_clean("image", load_image, path)
    assert isinstance(err, BadImageError) and "longer than the file system allows" in err.message
    assert len(err.message) < 400  # the path is shortened in the message


def test_truncated_png_and_jpeg_by_path_and_lazily_opened(tmp_path: Path) -> None:
    for fmt, name in (("PNG", "t.png"), ("JPEG", "t.jpg")):
        data = png_bytes(Image.fromarray(rgb(64, 64)), fmt)
        path = tmp_path / name
        path.write_bytes(data[: len(data) // 2])
        err = expect_clean("image", load_image, path)
        assert isinstance(err, BadImageError) and name in err.message and "truncated" in err.message
        lazy = Image.open(path)  # header only: the truncation shows when the pixels are decoded
        err = expect_clean("image", load_image, lazy)
        assert isinstance(err, BadImageError) and "truncated" in err.message + err.hint


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d, "is a folder"),
        (lambda d: d / "missing.png", "not found"),
        (lambda d: write(d / "zero.png", b""), "empty file"),
        (lambda d: write(d / "text.png", b"hello"), "not a readable image"),
        (lambda d: os.mkfifo(d / "fifo.png") or d / "fifo.png", "not a regular file"),  # must not block
        (lambda d: "", "path is empty"),
        (lambda d: str(d / "nul\x00.png"), "not a valid path"),
    ],
)
def test_bad_image_paths(tmp_path: Path, make, message: str) -> None:
    err = expect_clean("image", load_image, make(tmp_path))
    assert isinstance(err, BadImageError) and message in err.message, err


# ----------------------------------------------------------------------------- explicit objects

PIXEL = {  # mode -> (fill colour, the RGB it must become)
    "1": (1, (255, 255, 255)),
    "L": (100, (100, 100, 100)),
    "LA": ((100, 0), (255, 255, 255)),  # fully transparent -> white
    "P": (0, (0, 0, 0)),
    "PA": ((0, 255), (0, 0, 0)),
    "I": (65535, (255, 255, 255)),
    "I;16": (65535, (255, 255, 255)),
    "F": (0.5, (128, 128, 128)),
    "RGBA": ((10, 20, 30, 255), (10, 20, 30)),
    "CMYK": ((0, 0, 0, 0), (255, 255, 255)),
    "YCbCr": ((255, 128, 128), (255, 255, 255)),
    "HSV": ((0, 0, 255), (255, 255, 255)),
}


@pytest.mark.parametrize("mode", sorted(PIXEL))
def test_pil_modes_become_the_right_rgb(mode: str) -> None:
    fill, expected = PIXEL[mode]
    out = assert_image(expect_clean("image", load_image, Image.new(mode, (3, 2), fill)), 2, 3)
    assert (out == expected).all(), (mode, out[0, 0])


@pytest.mark.parametrize(
    ("array", "ok"),
    [
        (np.ones((4, 5), bool), True),
        (np.full((4, 5, 3), 2.0), False),
        (np.full((4, 5, 3), np.nan), False),
        (np.full((4, 5), -np.inf), False),
        (np.zeros((0, 5, 3), np.uint8), False),
        (np.zeros((4, 5, 1), np.uint8), True),
        (np.zeros((4, 5, 4), np.uint8), True),
        (np.zeros((1, 1, 4, 5, 3), np.uint8), False),
        (np.zeros((4, 5, 3), complex), False),
        (np.zeros((4, 5, 3), object), False),
        (np.zeros((4, 5)).view(np.matrix), True),  # used to corrupt memory (numpy matrices stay 2-D)
        (np.ma.masked_array(np.zeros((4, 5, 3)), mask=True), True),
        (np.zeros((8, 10, 3), np.uint8)[::2, ::2], True),
    ],
)
def test_odd_numpy_arrays(array: np.ndarray, ok: bool) -> None:
    out = expect_clean("image", load_image, array)
    assert isinstance(out, np.ndarray) if ok else isinstance(out, BadImageError), out


def test_odd_tensors() -> None:
    dense = torch.rand(3, 5, 6)
    expected = load_image(dense)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.quantize_per_tensor(dense, 1 / 255, 0, torch.quint8)
        cases = {
            "sparse": dense.to_sparse(),
            "sparse_csr": dense[0].to_sparse_csr(),
            "grad": dense.clone().requires_grad_(),
            "non_contiguous": dense.permute(0, 2, 1).contiguous().permute(0, 2, 1),
        }
        for name, tensor in cases.items():
            want = load_image(dense[0]) if name == "sparse_csr" else expected
            assert np.array_equal(expect_clean("image", load_image, tensor), want), name
        assert np.abs(load_image(quantized).astype(int) - expected).max() <= 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested tensors are a prototype API
        nested = torch.nested.nested_tensor([dense])
    for tensor, message in (
        (torch.empty(3, 5, 6, device="meta"), "meta device"),
        (torch.zeros(3, 5, 6, dtype=torch.complex64), "complex"),
        (nested, "nested"),
    ):
        err = expect_clean("image", load_image, tensor)
        assert isinstance(err, BadImageError) and message in err.message, err


def test_every_predictor_entry_point_refuses_a_bad_image_and_keeps_its_image(segmenter, referrer) -> None:
    good, bad = rgb(8, 8), torch.empty(3, 5, 6, device="meta")
    for predictor, call in (
        (segmenter, lambda p: p.segment(bad, ["red circle", "other"])),
        (segmenter, lambda p: p.infer(bad, ["red circle", "other"])),
        (referrer, lambda p: p.refer(bad, "the red circle")),
        (referrer, lambda p: p.refer_all(bad, ["the red circle"])),
        (referrer, lambda p: p.infer(bad, ["the red circle"])),
        (segmenter, lambda p: p.set_image(bad)),
        (referrer, lambda p: p.prepare(bad)),
    ):
        predictor.set_image(good)
        err = expect_clean("image", call, predictor)
        assert isinstance(err, BadImageError), err
        assert predictor.image is not None and np.array_equal(predictor.image, good)  # nothing lost


# ----------------------------------------------------------------------------- devices

KNOWN = ["cpu", "cuda", "cuda:0", "cuda:1", "cuda:99", "mps", "meta", "xla", "xpu", "hpu", "auto", "bogus"]


@st.composite
def device_names(draw: st.DrawFn) -> object:
    name = draw(st.sampled_from(KNOWN))
    name = "".join(c.upper() if draw(st.booleans()) else c for c in name)  # random case
    return draw(st.sampled_from(["", " ", "\t"])) + name + draw(st.sampled_from(["", " ", "\n"]))


DEVICES = st.one_of(
    device_names(),
    device_names(),
    st.sampled_from(["cpu", "auto", "CPU", " Auto", "cpu:0"]),
    st.text(max_size=10),
    st.integers(-2, 100),
    st.none(),
    st.booleans(),
    st.floats(),
    st.binary(max_size=4),
    st.sampled_from([torch.device("cpu"), torch.device("meta"), torch.device("cuda", 7), object()]),
)


def usable(device: torch.device) -> bool:
    if device.type == "meta":
        return False
    try:
        torch.zeros(1, device=device)
    except Exception:
        return False
    return True


@settings(parent=ROBUST, max_examples=80)
@given(device=DEVICES)
def test_generated_device_names(device: object) -> None:
    out = expect_clean("device", resolve_device, device)
    if isinstance(out, LangsegError):
        assert isinstance(out, BadConfigError) and "--device auto" in out.hint, out
        if "empty" not in out.message and "must be a name" not in out.message:
            assert "devices here: cpu" in out.message, out.message  # names what there is
        assert not (isinstance(device, str) and device.strip().lower() in ("cpu", "auto")), device
        return
    assert isinstance(out, torch.device) and usable(out), (device, out)
    if isinstance(device, str):
        assert out.type == device.strip().lower().split(":")[0] or device.strip().lower() == "auto"


@ROBUST
@given(device=DEVICES)
def test_generated_devices_reach_load_and_predictors(device: object) -> None:
    loaded = expect_clean("device", langseg.load, "vlt-shapes", device=device)
    direct = expect_clean("device", resolve_device, device)
    if isinstance(direct, LangsegError):
        assert isinstance(loaded, BadConfigError) and loaded.message == direct.message
    else:
        assert loaded.device == direct and next(loaded.model.parameters()).device.type == direct.type


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("cuda:99", "is not available"),
        ("mps", "is not available"),
        ("meta", "is not available"),
        ("bogus", "unknown device 'bogus'"),
        ("", "empty"),
        (-1, "unknown device -1"),
        (3.5, "must be a name"),
        (b"cpu", "must be a name"),
        (True, "must be a name"),
    ],
)
def test_unusable_devices_name_themselves_and_the_devices_there_are(device: object, message: str) -> None:
    err = expect_clean("device", resolve_device, device)
    assert isinstance(err, BadConfigError) and message in err.message, err
    assert "--device auto" in err.hint and "cpu" in err.hint
    if "available" in message or "unknown" in message:
        assert "devices here: cpu" in err.message


def test_cuda_without_a_gpu_and_the_accepted_spellings() -> None:
    if not torch.cuda.is_available():
        for name in ("cuda", "CUDA", "cuda:0", 0):
            err = expect_clean("device", resolve_device, name)
            assert isinstance(err, BadConfigError) and "not available" in err.message
    else:
        assert resolve_device("CUDA:0") == torch.device("cuda", 0)
    for name in ("CPU", " cpu ", "Cpu", None, torch.device("cpu"), "AUTO"):
        assert usable(expect_clean("device", resolve_device, name)), name
    # The predictors' own constructors check too (no torch RuntimeError from nn.Module.to).
    model = langseg.load("vlt-shapes").model
    err = expect_clean("device", langseg.predict.Referrer, model, None, device="cuda:99")
    assert isinstance(err, BadConfigError)
