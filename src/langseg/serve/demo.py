"""The Gradio web demo behind ``langseg demo``: segment an image into labels, or find the objects that
expressions refer to, in the browser.

Two tabs, "Segment" (an image and comma-separated labels) and "Refer" (an image and expressions, one per
line), each with a model picker and a Run button, show the overlay with its legend, a per-label view, the
area table, and the mask as downloads (a palette PNG and JSON with COCO RLE, as ``langseg serve`` answers).
Examples are ShapeWorld scenes rendered at startup, so the demo works offline with the bundled models.

Gradio is imported only here (the ``demo`` extra); everything else comes from :mod:`langseg.serve.service`.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from langseg.errors import BadConfigError, BadExpressionError, BadImageError, BadLabelsError, LangsegError
from langseg.serve.service import (
    Limits,
    Models,
    check_expressions,
    check_labels,
    decode_image,
    refer_answer,
    segment_answer,
    split_labels,
)

if TYPE_CHECKING:
    import gradio as gr

# Scenes of the examples: (seed, index, background), every background kind; chosen with four to six
# objects, relations among them to refer to, and none under the overlay's legend (bottom right).
EXAMPLE_SCENES = ((4, 7, "noise"), (4, 2, "plain"), (0, 9, "texture"), (0, 11, "noise"))
EXAMPLE_SIZE = 256
# The per-label view (AnnotatedImage) writes one PNG per label: shrunk to this side it stays cheap for
# large images and many labels; the overlay and the downloads keep the full size.
ANNOTATED_MAX_SIDE = 1024
# Result folders kept on disk: Gradio copies returned files into its own cache before the next call runs
# (inference runs one call at a time), so older ones only take space.
KEEP_RESULT_FOLDERS = 4
TABLE_HEADERS = ["label", "area %", "score"]
LABELS_HINT = "Type two or more labels separated by commas, e.g. red circle, blue square, background."
EXPRESSIONS_HINT = "Type an expression that names one object, e.g. the large circle on the left."
INTRO = (
    "# langseg: segment images with language\n"
    "**Segment**: name the things to find, separated by commas (add `background` or `other` for the "
    "rest). **Refer**: describe objects in words, one expression per line. Pick an example below the "
    "inputs, or upload your own image."
)


def require_demo_extra() -> Any:
    """The ``gradio`` module; raises :class:`~langseg.errors.BadConfigError` when the extra is missing."""
    # Gradio reads this at import: no usage report or version check leaves the machine.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError as err:
        raise BadConfigError(
            "the web demo needs gradio, which is not installed", hint='pip install "langseg[demo]"'
        ) from err
    return gradio


def launch_options(limits: Limits = Limits()) -> dict[str, Any]:
    """``Blocks.launch`` keywords for a local, offline demo (no share link, no analytics, no SSR node
    server, uploads capped at ``limits.max_body_bytes``); host, port and thread lock are the caller's."""
    return {
        "share": False,
        "inbrowser": False,
        "show_error": False,  # unexpected errors stay in the server log; user errors carry their own text
        "max_file_size": limits.max_body_bytes,
        "ssr_mode": False,
        "mcp_server": False,
        "pwa": False,
        "enable_monitoring": False,
        "footer_links": [],
    }


def user_error(err: LangsegError) -> Exception:
    """A :class:`gradio.Error` (shown in the page as a message, never a traceback) for a user's error."""
    gr = require_demo_extra()
    # The message starts lowercase by design and may begin with a model name: kept as it is.
    return gr.Error(f"{err.message.rstrip('.')}. {err.hint}", duration=15, print_exception=False)


def _hex(colour: np.ndarray) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(c) for c in colour))


def annotated(image: np.ndarray, masks: list[tuple[np.ndarray, str]]) -> tuple[np.ndarray, list[Any]]:
    """An ``AnnotatedImage`` value: the image and its masks, subsampled to at most ``ANNOTATED_MAX_SIDE``."""
    step = max(1, -(-max(image.shape[:2]) // ANNOTATED_MAX_SIDE))
    return image[::step, ::step], [(mask[::step, ::step].astype(np.float32), label) for mask, label in masks]


class DemoRunner:
    """The demo's callbacks, free of Gradio events so that they can be called (and tested) directly.

    Each returns the outputs of its tab in order: overlay (PIL image with legend), the per-label view
    (an ``AnnotatedImage`` value), the area table rows, the mask PNG path and the JSON path. A user's
    error raises :class:`gradio.Error`.

    Args:
        models: the models offered (each loaded once, on first use).
        limits: what one request may ask for.
        folder: where results and examples are written; a temporary folder removed at exit if ``None``.
    """

    def __init__(self, models: Models, limits: Limits = Limits(), folder: Path | None = None) -> None:
        self.models = models
        self.limits = limits
        if folder is None:
            folder = Path(tempfile.mkdtemp(prefix="langseg-demo-"))
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
        self.folder = folder
        self._results: deque[Path] = deque()
        self._lock = threading.Lock()  # Gradio calls from worker threads (one at a time, but be safe)

    def segment(
        self, image: str | None, labels: str, threshold: float | None, model: str | None
    ) -> tuple[Any, ...]:
        """Segment the image file ``image`` into the comma-separated ``labels``."""
        try:
            name = self.models.resolve(model, "semantic")
            array = self._image(image)
            # Blank items (a trailing comma) are a typo, not a label.
            names = check_labels([label for label in split_labels(labels or "") if label], self.limits)
            if not names:  # the predictor's own hint speaks Python; this one speaks the page
                raise BadLabelsError("no labels given", hint=LABELS_HINT)
            # 0 is "off": no probability is below it, so it would only demand a background label.
            cutoff = float(threshold) if threshold else None
            result = self.models.get(name).segment(array, names, cutoff, keep_scores=True)
        except LangsegError as err:
            raise user_error(err) from err
        areas, scores = result.areas(), result.label_scores()
        colours = result.colours()
        rows = [[label, round(100 * areas[label], 2), round(scores[label], 3)] for label in areas]
        view = annotated(
            result.image,
            [(result.mask == k, label) for k, label in enumerate(result.labels) if label in areas],
        )
        colour_map = {label: _hex(colours[k]) for k, label in enumerate(result.labels)}
        folder = self._result_folder()
        mask_path, json_path = folder / "segmentation_mask.png", folder / "segmentation.json"
        result.save_mask(mask_path)
        json_path.write_text(json.dumps(segment_answer(result, name)))
        return result.overlay(), self._view(view, colour_map), rows, str(mask_path), str(json_path)

    def refer(self, image: str | None, expressions: str, model: str | None) -> tuple[Any, ...]:
        """Find the objects the ``expressions`` (one per line) refer to in the image file ``image``."""
        from langseg.predict import ReferringSet

        try:
            name = self.models.resolve(model, "referring")
            array = self._image(image)
            lines = [line.strip() for line in (expressions or "").splitlines()]
            if not any(lines):
                raise BadExpressionError("no expression given", hint=EXPRESSIONS_HINT)
            texts = check_expressions([line for line in lines if line], self.limits)
            # Scores kept: where two masks overlap, the pixel goes to the more probable expression.
            results = ReferringSet(self.models.get(name).refer_all(array, texts, keep_scores=True))
        except LangsegError as err:
            raise user_error(err) from err
        colours = results.colours()
        rows = [[r.text, round(100 * float(r.mask.mean()), 2), round(r.score, 3)] for r in results.results]
        view = annotated(results.image, [(r.mask, r.text) for r in results.results])
        colour_map = {r.text: _hex(colours[k]) for k, r in enumerate(results.results, start=1)}
        folder = self._result_folder()
        mask_path, json_path = folder / "referring_mask.png", folder / "referring.json"
        results.save_mask(mask_path)
        json_path.write_text(json.dumps(refer_answer(results, name)))
        return results.overlay(), self._view(view, colour_map), rows, str(mask_path), str(json_path)

    def _image(self, path: str | None) -> np.ndarray:
        """The uploaded image, its pixel count checked against the limit before it is decoded."""
        if not path:
            raise BadImageError("no image given", hint="Upload an image, or click one of the examples.")
        try:
            data = Path(path).read_bytes()
        except OSError as err:
            raise BadImageError(f"the uploaded image cannot be read ({err.strerror})") from err
        return decode_image(data, self.limits)

    @staticmethod
    def _view(view: tuple[np.ndarray, list[Any]], colour_map: dict[str, str]) -> Any:
        # The colours travel with the value so the per-label view matches the overlay's legend.
        gr = require_demo_extra()
        return gr.AnnotatedImage(value=view, color_map=colour_map)

    def _result_folder(self) -> Path:
        """A fresh folder for one call's downloads; the oldest beyond ``KEEP_RESULT_FOLDERS`` is removed."""
        (self.folder / "results").mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(dir=self.folder / "results"))
        with self._lock:
            self._results.append(folder)
            old = [self._results.popleft() for _ in range(len(self._results) - KEEP_RESULT_FOLDERS)]
        for path in old:
            shutil.rmtree(path, ignore_errors=True)
        return folder


def example_scenes(folder: Path) -> list[tuple[Path, str, str]]:
    """ShapeWorld scenes written as PNGs into ``folder``, each with labels naming its objects (plus
    ``background``) and a few of the expressions ShapeWorld generates for it: ``(path, labels, texts)``."""
    from PIL import Image

    from langseg.data import ShapeWorldConfig, render_scene, scene_expressions

    folder.mkdir(parents=True, exist_ok=True)
    examples = []
    for seed, index, background in EXAMPLE_SCENES:
        config = ShapeWorldConfig(size=EXAMPLE_SIZE, background=background)  # type: ignore[arg-type]
        scene = render_scene(seed=seed, index=index, config=config)
        path = folder / f"shapeworld_{seed}_{index}_{background}.png"
        Image.fromarray(scene.image).save(path)
        labels = sorted({f"{obj.colour} {obj.shape}" for obj in scene.objects})
        # One expression for each of up to three objects, preferring relations and positions (the
        # interesting ones) over plain attributes.
        best: dict[int, Any] = {}
        for expr in scene_expressions(scene):
            rank = ("attribute", "position", "relation").index(expr.kind)
            if expr.target not in best or rank > best[expr.target][0]:
                best[expr.target] = (rank, expr.text)
        texts = [text for _, text in list(best.values())[:3]]
        examples.append((path, ", ".join([*labels, "background"]), "\n".join(texts)))
    return examples


def build_demo(models: Models, limits: Limits = Limits(), folder: Path | None = None) -> gr.Blocks:
    """The Gradio app: a "Segment" and a "Refer" tab over ``models`` (a tab only for a task with a
    model), inference one call at a time with at most ``limits.queue_size`` waiting.

    Args:
        models: the models offered; each tab's picker lists ``models.offered(task)``.
        limits: image pixels, labels and expressions per request, and the queue's size.
        folder: where examples and results are written (a temporary folder if ``None``).
    """
    gr = require_demo_extra()
    tasks = [task for task in ("semantic", "referring") if models.offered(task)]
    if not tasks:
        raise BadConfigError(
            "the demo has no model to serve", hint="Name a model: langseg demo --model lseg-shapes."
        )
    runner = DemoRunner(models, limits, folder)
    examples = example_scenes(runner.folder / "examples")
    with gr.Blocks(title="langseg demo", analytics_enabled=False, delete_cache=(1800, 3600)) as demo:
        gr.Markdown(INTRO)
        with gr.Tabs():
            if "semantic" in tasks:
                with gr.Tab("Segment", id="segment", elem_id="segment-tab"):
                    _task_tab(
                        gr, runner.segment, models, "semantic", [(p, labels) for p, labels, _ in examples]
                    )
            if "referring" in tasks:
                with gr.Tab("Refer", id="refer", elem_id="refer-tab"):
                    _task_tab(gr, runner.refer, models, "referring", [(p, texts) for p, _, texts in examples])
    # A predictor keeps per-image state: one inference at a time over both tabs, a bounded waiting line.
    demo.queue(max_size=limits.queue_size, default_concurrency_limit=1)
    return demo


def _task_tab(
    gr: Any, callback: Callable[..., tuple[Any, ...]], models: Models, task: str, examples: list[Any]
) -> None:
    """One tab's inputs, outputs, examples and Run button (inside the current ``gr.Tab``)."""
    semantic = task == "semantic"
    prefix = "segment" if semantic else "refer"
    with gr.Row():
        with gr.Column(scale=1):
            # A file path, not decoded pixels: the pixel limit is checked before decoding.
            image = gr.Image(
                label="Image",
                type="filepath",
                image_mode=None,
                sources=["upload", "clipboard"],
                elem_id=f"{prefix}-image",
            )
            if semantic:
                text = gr.Textbox(
                    label="Labels (comma-separated)",
                    placeholder="red circle, blue square, background",
                    elem_id="segment-labels",
                )
                threshold = gr.Slider(
                    0.0,
                    1.0,
                    value=0.0,
                    step=0.05,
                    label="Background threshold (0: off)",
                    info="Pixels that no label reaches this probability for go to background / other.",
                )
            else:
                text = gr.Textbox(
                    label="Expressions (one per line)",
                    placeholder="the large circle on the left",
                    lines=3,
                    elem_id="refer-expressions",
                )
            model = gr.Dropdown(choices=models.offered(task), value=models.defaults[task], label="Model")
            run = gr.Button("Run", variant="primary", elem_id=f"{prefix}-run")
        with gr.Column(scale=1):
            overlay = gr.Image(
                label="Overlay", type="pil", format="png", interactive=False, elem_id=f"{prefix}-overlay"
            )
            table = gr.Dataframe(
                headers=TABLE_HEADERS,
                datatype=["str", "number", "number"],
                interactive=False,
                label="Area and score per " + ("label" if semantic else "expression"),
                elem_id=f"{prefix}-table",
            )
            with gr.Row():
                mask_file = gr.File(label="Mask (palette PNG)", elem_id=f"{prefix}-mask")
                json_file = gr.File(label="Masks (JSON, COCO RLE)", elem_id=f"{prefix}-json")
            with gr.Accordion("Per-label view (hover a label)", open=False):
                view = gr.AnnotatedImage(label="Per-label view", format="png", elem_id=f"{prefix}-view")
    gr.Examples(examples=[[str(path), words] for path, words in examples], inputs=[image, text])
    inputs = [image, text, threshold, model] if semantic else [image, text, model]
    run.click(
        callback,
        inputs=inputs,
        outputs=[overlay, view, table, mask_file, json_file],
        api_name=prefix,
        concurrency_limit=1,
        concurrency_id="inference",
    )


def run_demo(
    models: list[str] | None,
    host: str = "127.0.0.1",
    port: int = 7860,
    device: str = "auto",
    limits: Limits = Limits(),
) -> None:
    """Serve the demo on ``host:port`` until interrupted (``langseg demo``).

    Args:
        models: the models offered; ``None``: every registered model whose weights are on this machine.
        host, port: where to listen (the default host is this machine only).
        device: where the models run.
        limits: what one request may ask for.
    """
    require_demo_extra()
    served = Models(models, device)
    for name in served.defaults.values():  # loaded now, so the first visitor does not wait for it
        served.get(name)
    demo = build_demo(served, limits)
    demo.launch(server_name=host, server_port=port, **launch_options(limits))
