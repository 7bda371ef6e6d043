"""``prepare_for_inference``: the encoder's own forward, with fused leaves, computes what the training-mode
modules compute in eval mode; ``ecgfm embed`` and finetune's predictions run it."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from ecgfm_cli.model.config import preset
from ecgfm_cli.model.encoder import EcgClassifier, EcgEncoder, SelfAttention, residual
from ecgfm_cli.model.inference import (
    Dense,
    FrozenPositionalEmbedding,
    FusedSelfAttention,
    WindowDense,
    inference_copy,
    prepare_for_inference,
)

TINY = preset("tiny").with_dropouts(0.0)


def _encoder(seed: int = 0) -> EcgEncoder:
    torch.manual_seed(seed)
    enc = EcgEncoder(TINY)
    with torch.no_grad():  # non-trivial norms and biases, so a swapped leaf that dropped one shows
        for name, p in enc.named_parameters():
            if name.endswith("bias") or "layer_norm" in name or "conv_layers.0.2" in name:
                p.add_(0.1 * torch.randn_like(p))
    return enc.eval()


def test_prepared_encoder_equals_the_training_modules_in_eval_mode():
    """fp32: the prepared encoder's embed (and token outputs) equal the unprepared encoder's to the embed
    tests' tolerance; bf16 under autocast stays within bf16 rounding of them."""
    enc = _encoder()
    x = torch.randn(3, 12, 1200)
    fp32, bf16 = inference_copy(enc), inference_copy(enc, torch.bfloat16)
    with torch.inference_mode():
        want_tokens, want = enc(x), enc.embed(x)
        torch.testing.assert_close(fp32(x), want_tokens, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(fp32.embed(x), want, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(fp32.embed(x[:1]), want[:1], atol=2e-5, rtol=1e-4)  # another row count
        with torch.autocast("cpu", torch.bfloat16):
            got16, want16 = bf16.embed(x), enc.embed(x)
    assert got16.dtype == torch.float32  # the mean is taken in float32
    cos = torch.nn.functional.cosine_similarity(got16, want, dim=1)
    assert cos.min() > 0.999
    torch.testing.assert_close(got16, want16, atol=3e-2, rtol=3e-2)


def test_prepare_swaps_the_leaves_in_place_and_copy_leaves_the_source():
    enc = _encoder()
    keys = {k: v.clone() for k, v in enc.state_dict().items()}
    prepared = inference_copy(enc)
    assert {k: v for k, v in enc.state_dict().items()}.keys() == keys.keys()  # the source is untouched
    assert all(torch.equal(v, keys[k]) for k, v in enc.state_dict().items())
    assert isinstance(enc.encoder.layers[0].self_attn, SelfAttention)

    same = prepare_for_inference(enc)
    assert same is enc and not enc.training
    assert not any(p.requires_grad for p in enc.parameters())
    for net in (prepared, enc):
        assert not any(isinstance(m, (nn.Linear, nn.Conv1d, SelfAttention)) for m in net.modules())
        assert isinstance(net.conv_pos, FrozenPositionalEmbedding)
        layer = net.encoder.layers[0]
        assert isinstance(layer.self_attn, FusedSelfAttention) and isinstance(layer.activation, nn.Identity)
        assert layer.fc1.gelu and not layer.fc2.gelu
        blocks = net.feature_extractor.conv_layers
        assert all(isinstance(b[0], WindowDense) for b in blocks)
        assert not blocks[0][0].gelu and isinstance(blocks[0][-1], nn.GELU)  # block 0: norm before its GELU
        assert all(b[0].gelu and isinstance(b[-1], nn.Identity) for b in blocks[1:])


def test_prepared_classifier_equals_the_classifier_and_keeps_its_head():
    torch.manual_seed(1)
    clf = EcgClassifier(TINY, n_labels=4, encoder=_encoder()).eval()
    x = torch.randn(2, 12, 800)
    prepared = inference_copy(clf)
    assert isinstance(prepared.proj, nn.Linear) and isinstance(prepared.encoder.post_extract_proj, Dense)
    with torch.inference_mode():
        torch.testing.assert_close(prepared(x), clf(x), atol=2e-5, rtol=1e-4)


def test_prepared_encoder_refuses_masks_and_attention_maps():
    prepared = inference_copy(_encoder())
    x = torch.randn(1, 12, 800)
    with pytest.raises(ValueError, match="unprepared encoder"):
        prepared.forward_with_attention(x)
    h = prepared.project(prepared.conv_features(x))[1]
    with pytest.raises(ValueError, match="padding mask"):
        prepared.contextualize(h, torch.zeros(1, h.shape[1], dtype=torch.bool))


def test_positional_spectrum_follows_the_weight():
    """The cached kernel spectrum is recomputed when the (folded) weight changes in place or moves."""
    enc = _encoder()
    pos = FrozenPositionalEmbedding(enc.conv_pos)
    x = torch.randn(2, 50, TINY.embed_dim)
    with torch.no_grad():
        torch.testing.assert_close(pos(x), enc.conv_pos(x), atol=1e-5, rtol=1e-4)
        pos.weight.mul_(-1.0)
        flipped = copy.deepcopy(enc.conv_pos)
        g = flipped.pos_conv[0].parametrizations.weight.original1
        g.mul_(-1.0)  # v -> -v: the weight-normed weight flips its sign, g unchanged
        torch.testing.assert_close(pos(x), flipped(x), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(copy.deepcopy(pos)(x), pos(x))


def test_residual_adds_in_place_only_without_autograd():
    h, x = torch.ones(2, 3), torch.full((2, 3), 2.0)
    with torch.no_grad():
        out = residual(h, x)
    assert out is h and torch.equal(h, torch.full((2, 3), 3.0))
    h = torch.ones(2, 3, requires_grad=True)
    out = residual(h * 1.0, x)
    assert torch.equal(out, torch.full((2, 3), 3.0)) and out.grad_fn is not None
    low = torch.ones(2, 3, dtype=torch.bfloat16)
    with torch.no_grad():
        promoted = residual(low, x)  # a sum that would change h's dtype is not written into h
    assert promoted.dtype == torch.float32 and torch.equal(low, torch.ones(2, 3, dtype=torch.bfloat16))


def test_embed_runs_the_prepared_encoder():
    from ecgfm_cli.contract import Contract
    from ecgfm_cli.embed import LoadedModel, embed_batch, prepare

    enc = _encoder()
    x = np.random.default_rng(0).standard_normal((3, 12, 2500)).astype(np.float32)
    with torch.no_grad():
        want = enc.embed(torch.from_numpy(x)).numpy()
    net = prepare(LoadedModel(copy.deepcopy(enc), Contract(), {}), "cpu", "float32")
    assert isinstance(net.encoder.layers[0].self_attn, FusedSelfAttention)
    np.testing.assert_allclose(embed_batch(net, x), want, atol=2e-5, rtol=1e-4)


def test_finetune_predictions_run_a_prepared_copy(monkeypatch):
    """``predict_outputs`` gives the classifier's outputs from a prepared copy and leaves the model (still
    training) as it was: its modules, its mode and its weights."""
    from ecgfm_cli.model import inference
    from ecgfm_cli.train import finetune

    copies = []
    real_copy = inference.inference_copy
    monkeypatch.setattr(inference, "inference_copy", lambda m, dtype: copies.append(real_copy(m, dtype)) or copies[-1])
    torch.manual_seed(2)
    clf = EcgClassifier(TINY, n_labels=3, encoder=_encoder())
    clf.train()
    X = np.random.default_rng(1).standard_normal((5, 12, 800)).astype(np.float32)
    monkeypatch.setattr(finetune, "iter_signals", lambda prep, batches: ((b, X[b]) for b in batches))
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    z = finetune.predict_outputs(clf, SimpleNamespace(labels=["a", "b", "c"]), np.arange(5), 2,
                                 torch.device("cpu"))
    assert len(copies) == 1 and isinstance(copies[0].encoder.encoder.layers[0].self_attn, FusedSelfAttention)
    assert clf.training and isinstance(clf.encoder.encoder.layers[0].self_attn, SelfAttention)
    assert all(torch.equal(v, before[k]) for k, v in clf.state_dict().items())
    with torch.no_grad():
        want = clf.eval()(torch.from_numpy(X)).double().numpy()
    assert z.shape == (5, 3) and z.dtype == np.float64
    np.testing.assert_allclose(z, want, atol=2e-5, rtol=1e-4)
