"""The web demo (``langseg demo``): its callbacks called directly, then the app driven in a real headless
Chromium through playwright, what the page shows read back and checked against the predictors.

Pixels are compared exactly: the demo serves the overlay as PNG (lossless) and the uploaded file reaches
the model unchanged, inference on this CPU is deterministic, so any difference is a bug, not noise.
The browser tests need Debian's chromium (playwright's own browser download cannot reach the network);
they are skipped, with the reason, only when no chromium is installed at all.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from langseg.data import ShapeWorldConfig, render_scene, scene_expressions
from langseg.errors import BadConfigError
from langseg.predict import Referrer, ReferringSet, Segmenter
from langseg.serve.demo import (
    DemoRunner,
    build_demo,
    example_scenes,
    launch_options,
    require_demo_extra,
    run_demo,
)
from langseg.serve.service import Limits, Models

pytestmark = pytest.mark.usefixtures("one_thread")

CHROMIUM = shutil.which("chromium") or next(
    (path for path in ("/usr/bin/chromium",) if Path(path).exists()), None
)
# Offline, quiet, and without the sandbox (tests may run as root in a container).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium installed (apt-get install chromium): the browser tests need one"
)
TIMEOUT_MS = 30_000  # generous for a loaded 2-core machine; a passing run takes a few seconds


def scene_file(folder: Path, seed: int, index: int, background: str = "noise") -> tuple[Path, Any]:
    """A ShapeWorld scene written as PNG, and the scene."""
    scene = render_scene(seed=seed, index=index, config=ShapeWorldConfig(size=256, background=background))
    path = folder / f"scene_{seed}_{index}.png"
    Image.fromarray(scene.image).save(path)
    return path, scene


def scene_labels(scene: Any) -> list[str]:
    return [*sorted({f"{obj.colour} {obj.shape}" for obj in scene.objects}), "background"]


def scene_texts(scene: Any) -> list[str]:
    """Expressions for two different objects of the scene, as ShapeWorld generates them."""
    texts: dict[int, str] = {}
    for expr in scene_expressions(scene):
        texts.setdefault(expr.target, expr.text)
    return list(texts.values())[:2]


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    return coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)


@pytest.fixture(scope="module")
def models() -> Models:
    """The demo's own models: loaded by name like ``langseg demo`` does, apart from the fixtures'."""
    return Models(["lseg-shapes", "vlt-shapes"], device="cpu")


# ------------------------------------------------------------------------------------ callbacks


def test_segment_callback_gives_the_mask_of_segment(
    models: Models, segmenter: Segmenter, tmp_path: Path
) -> None:
    path, scene = scene_file(tmp_path, seed=7, index=3)
    labels = scene_labels(scene)
    runner = DemoRunner(models, folder=tmp_path / "demo")
    overlay, _, rows, mask_path, json_path = runner.segment(str(path), ", ".join(labels) + ",", 0.0, None)
    expected = segmenter.segment(scene.image, labels, keep_scores=True)
    assert np.array_equal(np.asarray(overlay), np.asarray(expected.overlay()))
    assert np.array_equal(np.asarray(Image.open(mask_path)), expected.mask)
    answer = json.loads(Path(json_path).read_text())
    assert answer["model"] == "lseg-shapes" and answer["labels"] == labels  # trailing comma dropped
    for segment in answer["segments"]:
        assert np.array_equal(decode_rle(segment["mask"]), expected.mask == segment["index"])
    assert [row[0] for row in rows] == list(expected.areas())
    # A background threshold reaches the predictor as background_threshold (0 on the slider: off).
    _, _, _, mask_path, _ = runner.segment(str(path), ", ".join(labels), 0.9, None)
    expected = segmenter.segment(scene.image, labels, background_threshold=0.9)
    assert np.array_equal(np.asarray(Image.open(mask_path)), expected.mask)


def test_refer_callback_gives_the_masks_of_refer_all(
    models: Models, referrer: Referrer, tmp_path: Path
) -> None:
    path, scene = scene_file(tmp_path, seed=7, index=3)
    texts = scene_texts(scene)
    runner = DemoRunner(models, folder=tmp_path / "demo")
    overlay, _, rows, mask_path, _ = runner.refer(str(path), "\n".join(["", *texts, "  "]), "vlt-shapes")
    expected = ReferringSet(referrer.refer_all(scene.image, texts, keep_scores=True))
    assert np.array_equal(np.asarray(overlay), np.asarray(expected.overlay()))
    assert np.array_equal(np.asarray(Image.open(mask_path)), expected.mask)
    assert [row[0] for row in rows] == texts


@pytest.mark.parametrize(
    ("call", "limits", "words"),
    [
        (("segment", None, "red circle, background"), Limits(), "Upload an image"),
        (("segment", "scene", "red circle"), Limits(), "would give every pixel that label"),
        (("segment", "scene", " , "), Limits(), "Type two or more labels"),
        (("segment", "scene", "a, b, c"), Limits(max_labels=2), "over this server's limit of 2"),
        (("segment", "scene", "a, b"), Limits(max_pixels=1000), "over this server's limit of 1,000"),
        (("segment", "not an image", "a, b"), Limits(), "not a readable image"),
        (("refer", "scene", "\n \n"), Limits(), "Type an expression"),
        (("refer", "scene", "x\n" * 3), Limits(max_expressions=2), "over this server's limit of 2"),
    ],
)
def test_user_errors_become_gradio_errors(
    models: Models, tmp_path: Path, call: tuple[str, str | None, str], limits: Limits, words: str
) -> None:
    kind, image, text = call
    if image == "scene":
        image = str(scene_file(tmp_path, seed=1, index=1)[0])
    elif image is not None:
        (tmp_path / "bad.png").write_bytes(image.encode())
        image = str(tmp_path / "bad.png")
    runner = DemoRunner(models, limits, folder=tmp_path / "demo")
    with pytest.raises(gr.Error, match=words) as caught:
        runner.segment(image, text, 0.0, None) if kind == "segment" else runner.refer(image, text, None)
    assert "Traceback" not in caught.value.message


def test_a_model_of_the_other_task_is_refused(models: Models, tmp_path: Path) -> None:
    image = str(scene_file(tmp_path, seed=1, index=1)[0])
    with pytest.raises(gr.Error, match="vlt-shapes is a referring model"):
        DemoRunner(models, folder=tmp_path / "demo").segment(image, "a, b", 0.0, "vlt-shapes")


def test_without_gradio_the_error_says_which_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio now raises ImportError
    with pytest.raises(BadConfigError) as caught:
        require_demo_extra()
    assert caught.value.hint == 'pip install "langseg[demo]"'


def test_run_demo_serves_locally_without_sharing(monkeypatch: pytest.MonkeyPatch) -> None:
    launched: dict[str, Any] = {}

    def launch(demo: gr.Blocks, **options: Any) -> None:  # instead of serving until interrupted
        launched.update(options, tabs=[b.label for b in demo.blocks.values() if isinstance(b, gr.Tab)])

    monkeypatch.setattr(gr.Blocks, "launch", launch)
    run_demo(["lseg-shapes"], port=7861, device="cpu", limits=Limits(max_body_bytes=1000))
    assert launched["server_name"] == "127.0.0.1" and launched["server_port"] == 7861
    assert launched["share"] is False and launched["max_file_size"] == 1000
    assert launched["tabs"] == ["Segment"]  # no referring model offered: no Refer tab


# ------------------------------------------------------------------------------------ browser


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: ``$LANGSEG_TEST_ARTIFACTS`` (CI uploads it), else a pytest temp folder."""
    folder = Path(os.environ.get("LANGSEG_TEST_ARTIFACTS") or tmp_path_factory.mktemp("artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def server(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The demo served in this process on a free port of 127.0.0.1; yields its URL."""
    demo = build_demo(models, Limits(), folder=tmp_path_factory.mktemp("demo"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    demo.launch(
        prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True, **launch_options()
    )
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def page(server: str) -> Iterator[Any]:
    """A Chromium page on the demo; on teardown, checks that nothing it loaded left this machine."""
    from playwright.sync_api import sync_playwright

    requests: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
        page.set_default_timeout(TIMEOUT_MS)
        page.on("request", lambda request: requests.append(request.url))
        page.goto(server)
        page.locator("#segment-run").wait_for()
        yield page
        browser.close()
    outside = [url for url in requests if not url.startswith((server, "data:", "blob:"))]
    assert not outside, f"the demo page tried the network: {outside[:5]}"


def download(page: Any, selector: str) -> bytes:
    """Click a ``gr.File`` output's download link like a user, and return the file's bytes."""
    with page.expect_download() as event:
        page.locator(f"{selector} a[download]").click()
    return Path(event.value.path()).read_bytes()


def image_src(page: Any, selector: str) -> str | None:
    image = page.locator(selector)
    return image.get_attribute("src") if image.count() else None


def wait_for_new_image(page: Any, selector: str, before: str | None) -> str:
    """Wait until the ``<img>`` at ``selector`` shows a picture other than ``before``; its src."""
    page.wait_for_function(
        "([selector, before]) => { const img = document.querySelector(selector);"
        " return img && img.complete && img.naturalWidth > 0 && img.src !== before; }",
        arg=[selector, before],
    )
    return page.locator(selector).get_attribute("src")


def run_and_read_overlay(page: Any, prefix: str) -> np.ndarray:
    """Click Run and return the overlay's pixels once a new one is shown."""
    before = image_src(page, f"#{prefix}-overlay img")
    page.locator(f"#{prefix}-run").click()
    src = wait_for_new_image(page, f"#{prefix}-overlay img", before)
    response = page.request.get(src)  # the browser context's own request: the bytes the page shows
    assert response.ok
    return pixels(response.body())


@needs_chromium
def test_segment_in_the_browser(page: Any, segmenter: Segmenter, tmp_path: Path, artifacts: Path) -> None:
    path, scene = scene_file(tmp_path, seed=5, index=7)
    labels = scene_labels(scene)
    page.get_by_role("tab", name="Segment").click()
    page.locator("#segment-image input[type=file]").set_input_files(str(path))

    # A user's error: the message and its hint in the page, no traceback, and the app keeps answering.
    page.locator("#segment-labels textarea").fill(labels[0])
    page.locator("#segment-run").click()
    toast = page.get_by_test_id("toast-body").filter(has_text="would give every pixel that label")
    toast.wait_for()
    assert "Add a second label" in toast.inner_text() and "Traceback" not in toast.inner_text()
    page.wait_for_timeout(500)  # the toast slides in: let the screenshot show it in place
    page.screenshot(path=artifacts / "demo_segment_error.png")

    page.locator("#segment-labels textarea").fill(", ".join(labels))
    shown = run_and_read_overlay(page, "segment")
    expected = segmenter.segment(scene.image, labels, keep_scores=True)
    assert np.array_equal(shown, np.asarray(expected.overlay()))

    mask = Image.open(io.BytesIO(download(page, "#segment-mask")))
    assert mask.mode == "P" and np.array_equal(np.asarray(mask), expected.mask)
    answer = json.loads(download(page, "#segment-json"))
    assert [s["label"] for s in answer["segments"]] == list(expected.areas())
    for segment in answer["segments"]:
        assert np.array_equal(decode_rle(segment["mask"]), expected.mask == segment["index"])
    table = page.locator("#segment-table").inner_text()
    assert all(label in table for label in expected.areas())

    page.screenshot(path=artifacts / "demo_segment.png", full_page=True)
    print(f"screenshots in {artifacts}")


@needs_chromium
def test_refer_in_the_browser(page: Any, referrer: Referrer, tmp_path: Path, artifacts: Path) -> None:
    path, scene = scene_file(tmp_path, seed=6, index=2, background="texture")
    texts = scene_texts(scene)
    page.get_by_role("tab", name="Refer").click()
    page.locator("#refer-image input[type=file]").set_input_files(str(path))
    page.locator("#refer-expressions textarea").fill("\n".join(texts))
    shown = run_and_read_overlay(page, "refer")
    expected = ReferringSet(referrer.refer_all(scene.image, texts, keep_scores=True))
    assert np.array_equal(shown, np.asarray(expected.overlay()))

    mask = Image.open(io.BytesIO(download(page, "#refer-mask")))
    assert np.array_equal(np.asarray(mask), expected.mask)
    answer = json.loads(download(page, "#refer-json"))
    assert [e["text"] for e in answer["expressions"]] == texts
    for expression, result in zip(answer["expressions"], expected.results, strict=True):
        assert np.array_equal(decode_rle(expression["mask"]), result.mask)

    page.screenshot(path=artifacts / "demo_refer.png", full_page=True)
    print(f"screenshots in {artifacts}")


@needs_chromium
def test_an_example_runs_in_the_browser(page: Any, segmenter: Segmenter, tmp_path: Path) -> None:
    # The same scenes the demo rendered at startup (rendering is deterministic): the last one here.
    from playwright.sync_api import expect

    path, labels, _ = example_scenes(tmp_path)[-1]
    page.get_by_role("tab", name="Segment").click()
    before = image_src(page, "#segment-image img")
    page.locator("#segment-tab").get_by_text(labels[:40]).click()
    expect(page.locator("#segment-labels textarea")).to_have_value(labels)  # filled asynchronously
    wait_for_new_image(page, "#segment-image img", before)
    shown = run_and_read_overlay(page, "segment")
    expected = segmenter.segment(np.asarray(Image.open(path)), labels.split(", "))
    assert np.array_equal(shown, np.asarray(expected.overlay()))
