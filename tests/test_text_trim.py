"""CLIP text towers run only up to the last end-of-text token, without batched matmuls.

Every check compares against open_clip's own full-context forward (``tower(tokens)`` or
``CLIP.encode_text``) on random weights: trimming is exact under a causal mask, whatever the weights.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from langseg.models.dense_clip import encode_tokens
from langseg.models.text import ClipTextEncoder, can_trim_text, encode_text_trimmed
from langseg.models.text_gru import ClipWordEncoder

CONTEXT = 16
VOCAB = 100
SOT, EOT = VOCAB - 2, VOCAB - 1  # as in CLIP: EOT is the largest id, which argmax pooling relies on
TINY = {"context_length": CONTEXT, "vocab_size": VOCAB, "width": 32, "heads": 4, "layers": 2}


def _tokens(lengths: list[int], context: int = CONTEXT, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``K x context`` ids (SOT, random words, EOT, zero padding) and their bool mask, one row per length.

    ``length`` counts SOT and EOT, so ``length == context`` fills the whole context.
    """
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), context, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, 0] = SOT
        ids[row, 1 : n - 1] = torch.randint(1, SOT, (n - 2,), generator=gen)
        ids[row, n - 1] = EOT
    return ids, ids != 0


def _tiny_encoder(**cfg: object) -> ClipTextEncoder:
    torch.manual_seed(0)
    return ClipTextEncoder(None, embed_dim=24, text_cfg={**TINY, **cfg}).eval()


def _op_counts(fn: Callable[[], object]) -> Counter[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return Counter(event.name for event in prof.events())


@pytest.mark.parametrize("lengths", [[3, 7, 5], [CONTEXT, 2, 9], [CONTEXT]])
def test_trimmed_label_embeddings_equal_the_full_forward(lengths: list[int]) -> None:
    encoder = _tiny_encoder()
    ids, _ = _tokens(lengths)
    with torch.no_grad():
        full = encoder.text(ids)  # open_clip: all CONTEXT positions
        trimmed = encoder.encode(ids)
        _, tokens = encode_text_trimmed(encoder.text, ids)
    assert can_trim_text(encoder.text)
    assert tokens.shape[1] == max(lengths)  # ran only up to the last EOT
    assert trimmed.shape == full.shape == (len(lengths), 24)
    torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=0)


def test_trimmed_ids_shorter_than_the_context_are_accepted() -> None:
    encoder = _tiny_encoder()
    ids, _ = _tokens([4, 6])
    with torch.no_grad():
        torch.testing.assert_close(encoder.encode(ids[:, :6]), encoder.text(ids), atol=1e-5, rtol=0)


def test_vit_b32_sized_tower_matches_its_full_forward() -> None:
    start = time.perf_counter()
    torch.manual_seed(0)
    encoder = ClipTextEncoder("ViT-B-32").eval()
    ids, _ = _tokens([5, 8, 77, 3, 12], context=77)
    ids = torch.where(ids == SOT, 49406, torch.where(ids == EOT, 49407, ids))  # CLIP's SOT/EOT ids
    with torch.no_grad():
        torch.testing.assert_close(encoder.encode(ids), encoder.text(ids), atol=1e-5, rtol=0)
        torch.testing.assert_close(encoder.encode(ids[:2]), encoder.text(ids[:2]), atol=1e-5, rtol=0)
    assert time.perf_counter() - start < 30  # a generous bound: it takes ~3 s on 2 CPU cores


def test_untrimmable_tower_falls_back_to_the_full_forward() -> None:
    encoder = _tiny_encoder(no_causal_mask=True, pool_type="first")
    ids, _ = _tokens([3, 7])
    assert not can_trim_text(encoder.text)
    with torch.no_grad():
        torch.testing.assert_close(encoder.encode(ids), encoder.text(ids), atol=0, rtol=0)
    last = _tiny_encoder(pool_type="last")  # pools the final padded position: needs every position
    assert not can_trim_text(last.text)


def test_dense_clip_text_matches_encode_text() -> None:
    torch.manual_seed(0)
    vision = {"image_size": 32, "patch_size": 16, "width": 32, "layers": 1, "head_width": 16}
    clip = open_clip.model.CLIP(24, vision, TINY).eval()
    ids, _ = _tokens([CONTEXT, 4, 9])
    assert can_trim_text(clip)
    with torch.no_grad():
        torch.testing.assert_close(encode_tokens(clip, ids), clip.encode_text(ids), atol=1e-5, rtol=0)


def _word_reference(encoder: ClipWordEncoder, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token features from open_clip's full forward: projected ``ln_final`` outputs, zero at pads."""
    padded = F.pad(ids, (0, encoder.text.context_length - ids.shape[1]))
    _, tokens = encoder.text(padded)
    return (tokens[:, : ids.shape[1]] @ encoder.text.text_projection) * mask[..., None]


@pytest.mark.parametrize("lengths", [[3, 7, 5], [CONTEXT, 2, 9]])
def test_clip_word_features_equal_the_full_forward(lengths: list[int]) -> None:
    torch.manual_seed(0)
    encoder = ClipWordEncoder(None, embed_dim=24, text_cfg=TINY).eval()
    ids, mask = _tokens(lengths)
    ids, mask = ids[:, : max(lengths)], mask[:, : max(lengths)]  # the tokenizer trims to the longest
    with torch.no_grad():
        words, out_mask, sentence = encoder(ids, mask)
        full_sentence = encoder.text(F.pad(ids, (0, CONTEXT - ids.shape[1])))[0]
        reference = _word_reference(encoder, ids, mask)
    assert words.shape == (len(lengths), max(lengths), 24) and torch.equal(out_mask, mask)
    torch.testing.assert_close(words, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(sentence, full_sentence, atol=1e-5, rtol=0)
    assert torch.all(words[~mask] == 0)


def test_clip_word_features_keep_columns_past_the_last_eot() -> None:
    # A mask longer than every EOT (extra padding columns) still gives B x L outputs, zero past the prompts.
    torch.manual_seed(0)
    encoder = ClipWordEncoder(None, embed_dim=24, text_cfg=TINY).eval()
    ids, mask = _tokens([3, 5])
    with torch.no_grad():
        words, _, _ = encoder(ids[:, :12], mask[:, :12])
        reference = _word_reference(encoder, ids[:, :12], mask[:, :12])
    assert words.shape == (2, 12, 24)
    torch.testing.assert_close(words, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_text_forwards_issue_no_batched_matmul(mode: str) -> None:
    # Frozen weights made nn.MultiheadAttention's in-projection an aten::bmm over the weight copied per
    # position; every text path must fold it into one (add)mm instead.
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    encoder = _tiny_encoder()
    words = ClipWordEncoder(None, embed_dim=24, text_cfg=TINY).eval()
    torch.manual_seed(0)
    vision = {"image_size": 32, "patch_size": 16, "width": 32, "layers": 1, "head_width": 16}
    clip = open_clip.model.CLIP(24, vision, TINY).eval().requires_grad_(False)
    ids, mask = _tokens([CONTEXT, 4, 9])
    for name, run in {
        "ClipTextEncoder.encode": lambda: encoder.encode(ids),
        "ClipWordEncoder.forward": lambda: words(ids, mask),
        "dense_clip.encode_tokens": lambda: encode_tokens(clip, ids),
    }.items():
        with context():
            ops = _op_counts(run)
        assert ops["aten::bmm"] == 0, f"{name} issued {ops['aten::bmm']} aten::bmm"
        # Per layer: the packed q/k/v projection, the output projection and the MLP's two linears.
        assert ops["aten::addmm"] + ops["aten::mm"] >= 4 * TINY["layers"], f"{name}: {dict(ops)}"


def test_gradients_flow_through_a_trainable_word_encoder() -> None:
    torch.manual_seed(0)
    encoder = ClipWordEncoder(None, embed_dim=24, text_cfg=TINY, trainable=True).train()
    ids, mask = _tokens([4, 9])
    words, _, sentence = encoder(ids[:, :9], mask[:, :9])
    (words.square().sum() + sentence.square().sum()).backward()
    missing = [n for n, p in encoder.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reached {missing}"


@pytest.mark.parametrize("checkpointing", [False, True])
def test_unfrozen_tower_gets_the_full_forwards_gradients(checkpointing: bool) -> None:
    # Training code may set requires_grad on the (frozen by default) LSeg text tower: trimmed and full
    # forwards must then give the same gradients, with or without gradient checkpointing.
    encoder = _tiny_encoder()
    encoder.text.requires_grad_(True).set_grad_checkpointing(checkpointing)
    ids, _ = _tokens([CONTEXT - 3, 5])
    grads = []
    for forward in (encoder.encode, encoder.text):
        encoder.zero_grad()
        forward(ids).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None})
    trimmed, full = grads
    assert trimmed.keys() == full.keys() and "text.transformer.resblocks.0.attn.in_proj_weight" in full
    for name in full:
        # Float noise only: summation order differs, so compare relative to each gradient's scale.
        scale = float(full[name].abs().max())
        torch.testing.assert_close(trimmed[name], full[name], atol=1e-5 * scale, rtol=0, msg=name)
