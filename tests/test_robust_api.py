"""Robustness of the Python API's argument types (issue 13): labels, thresholds, expressions, model
names, options and keyword arguments of ``load`` / ``create_model`` / predictor calls end in a correct
result or a clean :class:`~langseg.errors.LangsegError`, never a TypeError from deep inside.

Hypothesis generates label lists of junk text (unicode, control and format characters, non-strings),
thresholds and flags of every type, expression iterables, model names and option values. Predictions run
on the bundled ``lseg-shapes`` and ``vlt-shapes`` (loaded once per module); option checks use
:func:`langseg.api.check_load`, which reads no weights.
"""

from __future__ import annotations

import itertools
import math
import re
import unicodedata
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import langseg
from langseg.api import check_load
from langseg.errors import (
    BadConfigError,
    BadExpressionError,
    BadLabelsError,
    LangsegError,
    MissingWeightsError,
    UnknownModelError,
)
from langseg.predict import ExpressionWarning
from tests.robust import ROBUST, expect_clean

pytestmark = pytest.mark.usefixtures("one_thread")
MANY = settings(parent=ROBUST, max_examples=40)
IMAGE = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)


# Text of every kind: letters, CJK, emoji, control and format characters, lone surrogates.
JUNK_TEXT = st.one_of(
    st.text(max_size=12),
    st.text(st.characters(categories=["Cc", "Cf", "Zs", "Cs", "Co", "Mn"]), max_size=4),
    st.sampled_from(
        ["red circle", "other", "background", ";", " ; ", "\u200b", "a;b; c", "{}", "<|endoftext|>"]
    ),
)
JUNK = st.one_of(st.none(), st.integers(), st.floats(), st.binary(max_size=4), st.booleans())


def visible(text: str) -> bool:
    return any(unicodedata.category(ch)[0] not in "CZ" for ch in text)


def labels_are_valid(items: list) -> bool:
    """The documented label contract, written independently of the Segmenter's parser."""
    if not 2 <= len(items) <= 1024 or not all(isinstance(item, str) for item in items):
        return False
    names = []
    for item in items:
        aliases = [part.strip() for part in item.split(";") if visible(part)]
        if not aliases:
            return False
        names.append(aliases[0])
    return len(set(names)) == len(names)


# Words of any script, with the odd control, format or combining character inside.
WORDS = st.text(
    st.characters(categories=["L", "N", "P", "S", "Zs", "Cc", "Cf", "Mn", "Cs"]), min_size=1, max_size=10
)


def with_junk(good: list) -> st.SearchStrategy[list]:
    """``good`` with one junk item put in at a random place."""
    return st.tuples(st.integers(0, len(good)), st.one_of(JUNK_TEXT, JUNK)).map(
        lambda at_bad: [*good[: at_bad[0]], at_bad[1], *good[at_bad[0] :]]
    )


LABEL_ITEMS = st.one_of(
    st.lists(WORDS, min_size=2, max_size=5, unique=True),  # mostly valid label sets
    st.lists(WORDS, min_size=2, max_size=5, unique=True),
    st.lists(WORDS, min_size=2, max_size=4).flatmap(with_junk),
    st.lists(st.one_of(JUNK_TEXT, JUNK), max_size=5),
)
CONTAINERS = ["list", "tuple", "generator", "dict"]


# ----------------------------------------------------------------------------- labels and thresholds


@MANY
@given(items=LABEL_ITEMS, container=st.sampled_from(CONTAINERS))
def test_generated_label_lists(segmenter, items: list, container: str) -> None:
    wrapped = {"list": list, "tuple": tuple, "generator": lambda xs: (x for x in xs)}.get(
        container, dict.fromkeys
    )
    try:
        labels = wrapped(items)
    except TypeError:  # unhashable items cannot be dict keys; the list itself still goes in
        labels, container = items, "list"
    out = expect_clean("api", segmenter.segment, IMAGE, labels)
    distinct = (
        list(dict.fromkeys(items))
        if container == "dict" and all(isinstance(i, str) for i in items)
        else items
    )
    if isinstance(out, LangsegError):
        assert isinstance(out, BadLabelsError) and not labels_are_valid(distinct), (items, out.message)
        return
    assert labels_are_valid(distinct), items
    assert len(out.labels) == len(distinct) and out.mask.shape == IMAGE.shape[:2]
    assert out.mask.min() >= 0 and out.mask.max() < len(out.labels)


@ROBUST
@given(
    names=st.lists(
        st.text(st.characters(categories=["L", "N", "So"]), min_size=1, max_size=12),
        min_size=2,
        max_size=6,
        unique=True,
    ),
    noise=st.sampled_from(["", "\x07", "\u200b", "\t", "\U0001f408"]),
)
def test_generated_valid_label_sets_in_any_script(segmenter, names: list[str], noise: str) -> None:
    labels = [name + noise for name in names]  # control/format characters inside a label are kept
    out = expect_clean("api", segmenter.segment, IMAGE, labels)
    assert not isinstance(out, LangsegError), (labels, out)
    assert out.labels == [label.strip() for label in labels] and out.mask.max() < len(labels)


THRESHOLDS = st.one_of(
    st.floats(0, 1),
    st.floats(),
    st.integers(-2, 2),
    st.text(max_size=4),
    st.none(),
    st.booleans(),
    st.sampled_from(["0.5", [0.5], np.float32(0.5), np.float64(0.25)]),
)


@MANY
@given(threshold=THRESHOLDS)
def test_generated_background_thresholds(segmenter, threshold: object) -> None:
    labels = ["red circle", "background"]
    out = expect_clean("api", segmenter.segment, IMAGE, labels, background_threshold=threshold)
    valid = threshold is None or (
        isinstance(threshold, (int, float, np.floating))
        and not isinstance(threshold, bool)
        and math.isfinite(threshold)
        and 0 < threshold < 1
    )
    assert isinstance(out, BadLabelsError) != valid, (threshold, out)
    if isinstance(out, BadLabelsError):
        assert "background_threshold" in out.message


@ROBUST
@given(flag=st.one_of(st.booleans(), JUNK, st.text(max_size=3)))
def test_generated_keep_scores_flags(segmenter, referrer, flag: object) -> None:
    seg = expect_clean("api", segmenter.segment, IMAGE, ["red circle", "other"], keep_scores=flag)
    ref = expect_clean("api", referrer.refer, IMAGE, "the red circle", keep_scores=flag)
    if isinstance(flag, bool):
        assert (seg.scores is not None) == flag and (ref.scores is not None) == flag
    else:  # "no" is true to Python: refusing it beats keeping scores nobody asked for
        assert isinstance(seg, BadConfigError) and isinstance(ref, BadConfigError)


# ----------------------------------------------------------------------------- expressions


SENTENCES = st.lists(WORDS, min_size=1, max_size=4).map(" ".join)


@MANY
@given(
    texts=st.one_of(
        st.lists(SENTENCES, min_size=1, max_size=4),
        st.lists(SENTENCES, min_size=1, max_size=3).flatmap(with_junk),
        st.lists(st.one_of(JUNK_TEXT, JUNK), max_size=4),
    ),
    container=st.sampled_from(["list", "tuple", "generator"]),
)
def test_generated_expression_iterables(referrer, texts: list, container: str) -> None:
    wrapped = {"list": list, "tuple": tuple, "generator": lambda xs: (x for x in xs)}[container](texts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExpressionWarning)  # junk names nothing the model knows
        out = expect_clean("api", referrer.refer_all, IMAGE, wrapped)
    # Documented: a non-empty list of strings, each with a word (a run of letters) in it.
    valid = bool(texts) and all(isinstance(t, str) and re.search(r"[^\W\d_]", t) for t in texts)
    if isinstance(out, LangsegError):
        assert isinstance(out, BadExpressionError) and not valid, (texts, out)
        return
    assert valid, texts
    assert len(out) == len(texts) and all(r.mask.shape == IMAGE.shape[:2] for r in out)
    assert [r.text for r in out] == texts


# ----------------------------------------------------------------------------- load / check_load

MODEL_NAMES = st.one_of(
    JUNK,
    st.text(st.characters(exclude_characters=":"), max_size=20),  # ':' names would resolve open_clip models
    st.lists(st.text(max_size=3), max_size=2),
    st.sampled_from(["", " ", "lseg-shape", "LSEG-SHAPES", "x" * 5000, "a/" * 3000, "/", "."]),
)


@MANY
@given(model=MODEL_NAMES)
def test_generated_model_arguments(model: object) -> None:
    out = expect_clean("api", langseg.load, model)
    assert isinstance(out, (BadConfigError, UnknownModelError, MissingWeightsError)), (model, out)
    if not isinstance(model, (str,)):
        assert isinstance(out, BadConfigError) and "model must be" in out.message


OPTION_NAMES = st.one_of(
    st.sampled_from(["plan", "dtype", "max_labels", "threshold", "upsample", "plann", "dtyp", "device_"]),
    st.from_regex(r"[a-z_]{1,12}", fullmatch=True),
)
OPTION_VALUES = st.one_of(
    JUNK,
    st.text(max_size=8),
    st.sampled_from(
        ["single", "paper", "native", "float32", "bfloat16", "Float16", "float99", "logits", "probability"]
    ),
    st.sampled_from([torch.float16, torch.int32, 0.35, 0.0, 1.0, float("nan"), 3, -1, 1 << 40]),
)
VALID = {
    "lseg-shapes": {
        "plan", "dtype", "max_labels", "text_cache_size", "feature_cache_bytes", "preprocess",
        "arch_option", "block_depth", "activation",
    },
    "vlt-shapes": {"threshold", "upsample", "dtype"},
}  # fmt: skip


GOOD_VALUES = {
    "plan": st.sampled_from(["single", "paper", "native", None]),
    "dtype": st.sampled_from(["float32", "bfloat16", "float16", " Float32", torch.bfloat16]),
    "max_labels": st.integers(-2, 5000),
    "text_cache_size": st.integers(-1, 64),
    "feature_cache_bytes": st.integers(-1, 1 << 40),
    "arch_option": st.sampled_from([None, 0, 1, 2, -1]),
    "threshold": st.floats(-0.5, 1.5),
    "upsample": st.sampled_from(["logits", "probability", "Logits", ""]),
}


@st.composite
def option_sets(draw: st.DrawFn, model: str) -> dict:
    """Options of ``model`` with plausible values (sometimes out of range), plus junk now and then."""
    keys = draw(st.lists(st.sampled_from(sorted(VALID[model] & set(GOOD_VALUES))), max_size=3, unique=True))
    options = {key: draw(GOOD_VALUES[key]) for key in keys}
    if draw(st.integers(0, 3)) == 0:
        options.update(draw(st.dictionaries(OPTION_NAMES, OPTION_VALUES, max_size=2)))
    return options


@settings(parent=ROBUST, max_examples=60)
@given(model=st.sampled_from(sorted(VALID)), data=st.data())
def test_generated_options(model: str, data: st.DataObject) -> None:
    options = data.draw(option_sets(model))
    out = expect_clean("api", check_load, model, **options)
    unknown = [key for key in options if key not in VALID[model]]
    if unknown:
        assert isinstance(out, BadConfigError) and "take no option" in out.message, (options, out)
        assert "Options of" in out.hint
        return
    if isinstance(out, LangsegError):
        assert isinstance(out, BadConfigError), out
        return
    parsed = out[1]
    assert isinstance(parsed.dtype, torch.dtype) and parsed.dtype.is_floating_point
    if model == "vlt-shapes":
        assert isinstance(parsed.threshold, float) and 0 < parsed.threshold < 1
        assert parsed.upsample in ("logits", "probability")
    else:
        assert isinstance(parsed.max_labels, int) and parsed.max_labels >= 1
        assert parsed.plan is None or parsed.plan in ("single", "paper", "native")


NETWORK_ARGUMENTS = {
    "vlt-tiny": ["hidden_dim", "num_heads", "input_size", "dropout", "text", "hiden_dim", "bogus"],
    "lseg-tiny": ["features", "embed_dim", "readout", "use_bn", "feature", "bogus"],
}


@ROBUST
@given(
    name=st.sampled_from(sorted(NETWORK_ARGUMENTS)),
    data=st.data(),
)
def test_generated_create_model_arguments(name: str, data: st.DataObject) -> None:
    key = data.draw(st.sampled_from(NETWORK_ARGUMENTS[name]))
    value = data.draw(
        st.one_of(st.none(), st.integers(-4, 48), st.text(max_size=3), st.floats(-2, 2), st.booleans())
    )
    out = expect_clean("api", langseg.create_model, name, **{key: value})
    if key in ("bogus", "hiden_dim", "feature"):
        assert isinstance(out, BadConfigError) and "takes no argument" in out.message
        assert key == "bogus" or "Did you mean" in out.hint
    else:
        assert isinstance(out, (torch.nn.Module, BadConfigError)), out


@ROBUST
@given(task=st.one_of(st.none(), st.sampled_from(["semantic", "referring"]), JUNK, st.text(max_size=6)))
def test_generated_list_models_filters(task: object) -> None:
    out = expect_clean("api", langseg.list_models, task=task)
    if task in (None, "semantic", "referring"):
        assert isinstance(out, list) and out
    else:
        assert isinstance(out, BadConfigError) and "unknown task" in out.message


# ----------------------------------------------------------------------------- the examples


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (None, "no labels given"),
        (3, "must be a list of strings"),
        (["red circle", 3], "every label must be a string"),
        (["red circle", ""], "empty label"),
        (["red circle", "\u200b\u200b"], "no visible characters"),
        (["red circle", "red circle"], "duplicate labels"),
        ([f"label {i}" for i in range(1025)], "over the limit of 1024"),
        (map(str, itertools.count()), "over the limit of 1024"),  # endless: an error, not a hang
        (b"red circle", "must be a list of strings"),
    ],
)
def test_bad_labels(segmenter, labels: object, message: str) -> None:
    err = expect_clean("api", segmenter.segment, IMAGE, labels)
    assert isinstance(err, BadLabelsError) and message in err.message, err


def test_labels_from_any_iterable_give_the_same_result(segmenter) -> None:
    want = segmenter.segment(IMAGE, ["red circle", "other"])
    for labels in (
        ("red circle", "other"),
        iter(["red circle", "other"]),
        (x for x in ["red circle", "other"]),
    ):
        got = expect_clean("api", segmenter.segment, IMAGE, labels)
        assert got.labels == want.labels and np.array_equal(got.mask, want.mask)


@pytest.mark.parametrize("threshold", ["0.5", float("nan"), 2, -0.1, 0.0, 1.0, [0.5], True])
def test_bad_thresholds(segmenter, threshold: object) -> None:
    err = expect_clean(
        "api", segmenter.segment, IMAGE, ["red circle", "background"], background_threshold=threshold
    )
    assert isinstance(err, BadLabelsError) and "background_threshold" in err.message
    err = expect_clean("api", langseg.load, "vlt-shapes", threshold=threshold)
    assert isinstance(err, BadConfigError) and "threshold" in err.message


def test_refer_all_takes_a_generator(referrer) -> None:
    texts = ["the red circle", "the blue square"]
    want = referrer.refer_all(IMAGE, texts)
    got = expect_clean("api", referrer.refer_all, IMAGE, (t for t in texts))
    assert [r.text for r in got] == texts
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(got, want, strict=True))
    err = expect_clean("api", referrer.refer_all, IMAGE, None)
    assert isinstance(err, BadExpressionError)
    err = expect_clean("api", referrer.refer_all, IMAGE, "the red circle")
    assert isinstance(err, BadExpressionError) and "single string" in err.message


@pytest.mark.parametrize(
    ("model", "error", "message"),
    [
        (None, BadConfigError, "model must be a registry name or a checkpoint path"),
        (3, BadConfigError, "model must be a registry name or a checkpoint path"),
        ("", BadConfigError, "model name is empty"),
        (b"lseg-shapes", BadConfigError, "got bytes"),
        ("x" * 5000, UnknownModelError, "unknown model"),  # too long for a file name: just a name
        ("d/" * 3000, MissingWeightsError, "cannot open"),  # a path too long for the file system
    ],
)
def test_bad_model_arguments(model: object, error: type, message: str) -> None:
    err = expect_clean("api", langseg.load, model)
    assert isinstance(err, error) and message in err.message, err


@pytest.mark.parametrize(
    ("call", "message", "hint"),
    [
        (
            lambda: langseg.load("lseg-shapes", plann="single"),
            "take no option 'plann'",
            "Did you mean 'plan'",
        ),
        (
            lambda: langseg.create_model("lseg-tiny", featurs=8),
            "no argument 'featurs'",
            "Did you mean 'features'",
        ),
        (lambda: langseg.create_model("vlt-tiny", hiden_dim=8), "no argument", "Did you mean 'hidden_dim'"),
        (lambda: langseg.load("lseg-shapes", dtype="float99"), "unknown dtype", "float32"),
        (lambda: langseg.load("lseg-shapes", plan=3), "plan must be", "single"),
        (lambda: langseg.load("lseg-shapes", max_labels="8"), "max_labels", ""),
        (lambda: langseg.load("lseg-shapes", preprocess=3), "preprocess", ""),
        (lambda: langseg.load("vlt-shapes", upsample=["logits"]), "upsample", "logits"),
        (lambda: langseg.load("vlt-shapes", weights=3), "weights must be a path", "path"),
        (lambda: langseg.create_model(None), "name must be", "langseg models"),
        (lambda: langseg.create_model("lseg-tiny", pretrained="yes"), "pretrained must be", ""),
        (lambda: langseg.create_model("lseg-tiny", embed_dim=-1), "cannot be built", "signature"),
        (lambda: langseg.list_models(task="semantc"), "unknown task", "Did you mean 'semantic'"),
        (lambda: langseg.list_models(family="lsegg"), "unknown family", "Did you mean 'lseg'"),
    ],
)
def test_bad_keyword_arguments(call, message: str, hint: str) -> None:
    err = expect_clean("api", call)
    assert isinstance(err, BadConfigError) and message in err.message and hint in err.hint, err


def test_good_variants_are_accepted() -> None:
    assert check_load("lseg-shapes", dtype=" Float16 ")[1].dtype == torch.float16
    assert check_load("vlt-shapes", threshold=np.float32(0.25))[1].threshold == 0.25
    assert isinstance(expect_clean("api", langseg.create_model, "vlt-tiny", hidden_dim=32), torch.nn.Module)
