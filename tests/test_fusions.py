"""Fused forms of the training forward give the same loss and gradients as the plain forms (issue 14's numerics:
each fusion on and off), and the loader-side masks and negatives (numpy) follow the rules and the distribution
of the torch ones the forward draws."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ecgfm_cli.model.config import preset
from ecgfm_cli.model.encoder import FUSIONS, SelfAttention, channel_norm, parse_fusions, use_fusions
from ecgfm_cli.model.masking import (
    TargetConfig,
    compute_span_mask,
    draw_negatives,
    draw_span_masks,
    draw_targets,
)
from ecgfm_cli.model.pretraining import PretrainConfig, Wav2Vec2Pretrainer, sample_negative_indices

pytestmark = pytest.mark.usefixtures("one_thread")


def _loss_and_grads(model: Wav2Vec2Pretrainer, x: torch.Tensor, targets: dict) -> tuple[float, dict]:
    """The W2V + CMSC training loss (per masked frame) of one forward with fixed masks, negatives, Gumbel
    noise and dropout draws, and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # dropout masks
    out = model(x, torch.arange(x.shape[0]) // 2, **targets, generator=torch.Generator().manual_seed(7))
    loss = out.loss / out.stats.sample_size
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _model_and_batch(seed: int = 0) -> tuple[Wav2Vec2Pretrainer, torch.Tensor, dict]:
    torch.manual_seed(seed)
    model = Wav2Vec2Pretrainer(preset("tiny"), PretrainConfig()).train()
    x = torch.randn(4, 12, 2500, generator=torch.Generator().manual_seed(seed))
    t = model.encoder_cfg.num_frames(2500)
    targets = {k: torch.from_numpy(v) for k, v in
               draw_targets(np.random.default_rng(seed), 4, TargetConfig(frames=t)).items()}
    return model, x, targets


def _assert_same(a: tuple[float, dict], b: tuple[float, dict], rtol: float = 1e-4, atol: float = 1e-6) -> None:
    assert a[0] == pytest.approx(b[0], rel=1e-5)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("fusion", ["group_norm", "qkv"])
def test_each_fusion_gives_the_same_loss_and_gradients(fusion):
    model, x, targets = _model_and_batch()
    with use_fusions(**{fusion: False}):
        plain = _loss_and_grads(model, x, targets)
    with use_fusions(**{fusion: True}):
        fused = _loss_and_grads(model, x, targets)
    _assert_same(plain, fused)


def test_group_norm_fusion_is_channel_norm_in_float32_and_bfloat16():
    h = torch.randn(3, 50, 8) * 3 + 1
    w, b = torch.randn(8), torch.randn(8)
    with use_fusions(group_norm=False):
        ref = channel_norm(h.double(), w.double(), b.double(), 1e-5)  # the two-pass formula, in float64
        plain16 = channel_norm(h.bfloat16(), w, b, 1e-5)
    with use_fusions(group_norm=True):
        fused = channel_norm(h, w, b, 1e-5)
        fused16 = channel_norm(h.bfloat16(), w, b, 1e-5)
    # channels-last in and out: the next block's windows are a view, not a copy
    assert fused.shape == h.shape and fused.is_contiguous()
    torch.testing.assert_close(fused.double(), ref, rtol=1e-5, atol=1e-5)
    assert fused16.dtype == torch.bfloat16
    torch.testing.assert_close(fused16.float(), plain16.float(), rtol=0, atol=0.04)  # one bf16 rounding apart


def test_sdpa_backends_give_the_same_attention_and_gradients():
    """The attention backend choice (math vs the CPU flash kernel; cuDNN / FlashAttention-2 on a GPU are picked
    by ``gpu_pretrain_mfu.py --sdpa``): same output and gradients at ECG-FM's 156 tokens."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    att = SelfAttention(64, 4, 0.0)
    x = torch.randn(3, 156, 64)
    results = {}
    for backend in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION):
        xi = x.clone().requires_grad_()
        att.zero_grad(set_to_none=True)
        with sdpa_kernel(backend):
            out = att(xi)[0]
        out.square().sum().backward()
        results[backend] = (out.detach(), xi.grad, att.q_proj.weight.grad.clone())
    for a, b in zip(results[SDPBackend.MATH], results[SDPBackend.FLASH_ATTENTION], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="torch.compile on CPU needs a C compiler")
def test_compiled_layers_give_the_same_loss_and_gradients():
    """``--compile`` (torch.compile per transformer layer: LayerNorm + residual + dropout + GELU fused by
    inductor) against eager. Dropout off: compiled code draws its own dropout masks."""
    from ecgfm_cli.model.encoder import compile_layers

    torch.manual_seed(0)
    enc = preset("tiny").with_dropouts(0.0)
    model = Wav2Vec2Pretrainer(enc, PretrainConfig(dropout_features=0.0)).train()
    x = torch.randn(4, 12, 2500, generator=torch.Generator().manual_seed(0))
    targets = {k: torch.from_numpy(v) for k, v in draw_targets(
        np.random.default_rng(0), 4, TargetConfig(frames=enc.num_frames(2500))).items()}
    eager = _loss_and_grads(model, x, targets)
    compile_layers(model.encoder)
    try:
        compiled = _loss_and_grads(model, x, targets)
    except torch._dynamo.exc.BackendCompilerFailed as e:  # a compiler that inductor cannot use: nothing to compare
        pytest.skip(f"torch.compile unavailable here: {e}")
    _assert_same(eager, compiled, rtol=1e-3, atol=1e-5)
    assert set(model.state_dict()) == set(Wav2Vec2Pretrainer(enc, PretrainConfig()).state_dict())


def test_use_fusions_restores_and_rejects_unknown_names():
    before = (FUSIONS.group_norm, FUSIONS.qkv)
    with use_fusions(group_norm=not before[0], qkv=not before[1]):
        assert (FUSIONS.group_norm, FUSIONS.qkv) == (not before[0], not before[1])
    assert (FUSIONS.group_norm, FUSIONS.qkv) == before
    with pytest.raises(ValueError, match="unknown fusion"), use_fusions(flash=True):
        pass
    assert parse_fusions("group_norm=0, qkv=1") == {"group_norm": False, "qkv": True}
    with pytest.raises(ValueError, match="NAME=0 or NAME=1"):
        parse_fusions("qkv")


def test_qkv_fusion_keeps_the_checkpoint_keys():
    model, x, targets = _model_and_batch()
    keys = set(model.state_dict())
    with use_fusions(qkv=True):
        model(x, torch.arange(4) // 2, **targets)
    assert set(model.state_dict()) == keys
    assert any(k.endswith("self_attn.q_proj.weight") for k in keys)


# ------------------------------------------------------------------------------ loader-side masks, negatives


def _row_runs(row: np.ndarray) -> list[int]:
    edges = np.diff(np.concatenate([[0], row.astype(np.int8), [0]]))
    return (np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)).tolist()


@pytest.mark.parametrize(("frames", "mask_length", "min_masks"), [(156, 10, 2), (30, 10, 2), (12, 10, 2),
                                                                   (156, 5, 20)])
def test_numpy_span_masks_follow_the_rules(frames, mask_length, min_masks):
    rng = np.random.default_rng(0)
    for _ in range(50):
        m = draw_span_masks(rng, 6, frames, 0.65, mask_length, min_masks)
        assert m.shape == (6, frames) and m.dtype == bool
        counts = m.sum(axis=1)
        assert (counts == counts[0]).all() and counts[0] >= 2
        one = draw_span_masks(rng, 1, frames, 0.65, mask_length, min_masks)[0]
        # a single row is not sub-sampled: a union of whole spans (a span may be cut at the end only)
        runs = _row_runs(one)
        assert all(r >= mask_length for r in runs[:-1] if r) and sum(runs) == one.sum()
    assert not draw_span_masks(rng, 3, frames, 0.0).any()
    assert draw_span_masks(rng, 0, frames).shape == (0, frames)


def _mask_stats(draw, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame masking frequency (T,) and the distribution of the per-row count over ``n`` batches."""
    freq, counts = 0.0, []
    for i in range(n):
        m = draw(i)
        freq = freq + m.mean(axis=0)
        counts.append(int(m[0].sum()))
    return freq / n, np.bincount(counts, minlength=200)[:200] / n


@pytest.mark.parametrize(("frames", "mask_length"), [(156, 10), (20, 10)])
def test_numpy_span_masks_have_the_torch_masks_distribution(frames, mask_length):
    n, b = 1500, 8
    g = torch.Generator().manual_seed(1)
    rng = np.random.default_rng(1)
    f_t, c_t = _mask_stats(lambda i: compute_span_mask((b, frames), 0.65, mask_length, 2, generator=g).numpy(), n)
    f_n, c_n = _mask_stats(lambda i: draw_span_masks(rng, b, frames, 0.65, mask_length, 2), n)
    # per-frame frequency: binomial noise over n * b rows is ~0.006; the profile (edges less masked) must agree
    assert np.abs(f_t - f_n).max() < 0.03
    assert abs(f_t.mean() - f_n.mean()) < 0.005
    # the masked-count distribution (what the batch equalisation leaves): total variation distance
    assert 0.5 * np.abs(c_t - c_n).sum() < 0.08


def test_numpy_negatives_follow_the_rules_and_the_torch_distribution():
    rng = np.random.default_rng(0)
    idx = draw_negatives(rng, 4, 30, 100)
    assert idx.shape == (4, 30, 100) and idx.dtype == np.int64
    assert idx.min() >= 0 and idx.max() < 30
    assert not (idx == np.arange(30)[None, :, None]).any()
    # uniform over the other frames, as the torch draw: counts of each offset for frame 5
    big = draw_negatives(rng, 400, 8, 100)[:, 5].ravel()
    ref = sample_negative_indices(400, 8, 100, generator=torch.Generator().manual_seed(0))[:, 5].reshape(-1).numpy()
    for draws in (big, ref):
        freq = np.bincount(draws, minlength=8) / draws.size
        assert freq[5] == 0
        np.testing.assert_allclose(np.delete(freq, 5), 1 / 7, atol=0.005)
    with pytest.raises(ValueError, match="at least 2"):
        draw_negatives(rng, 2, 1)


def test_draw_targets_feed_the_forward_and_are_seeded():
    model, x, targets = _model_and_batch()
    cfg = TargetConfig(frames=model.encoder_cfg.num_frames(2500), num_negatives=model.cfg.num_negatives)
    a = draw_targets(np.random.default_rng(5), 4, cfg)
    b = draw_targets(np.random.default_rng(5), 4, cfg)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    t_masked = int(a["mask"][0].sum())
    assert a["negatives_idx"].shape == (4, t_masked, model.cfg.num_negatives)
    out = model(x, torch.arange(4) // 2, mask=torch.from_numpy(a["mask"]),
                negatives_idx=torch.from_numpy(a["negatives_idx"]))
    assert out.logits.shape == (4, t_masked, 1 + model.cfg.num_negatives)
    assert torch.isfinite(out.loss)


def test_masking_imports_without_torch():
    """The loader's threads (train.data, torch-free at import) can draw the targets."""
    code = "import sys, ecgfm_cli.model.masking; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_channel_norm_grad_matches_reference_group_norm():
    """The fused form is also torch's own GroupNorm(C, C) on the (B, C, T) layout, forward and backward."""
    h = torch.randn(2, 40, 6, requires_grad=True)
    w, b = torch.randn(6, requires_grad=True), torch.randn(6, requires_grad=True)
    with use_fusions(group_norm=True):
        y = channel_norm(h, w, b, 1e-5)
    ref = F.group_norm(h.transpose(1, 2), 6, w, b, 1e-5).transpose(1, 2)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (h, w, b), g)
    want = torch.autograd.grad(ref, (h, w, b), g)
    for a, c in zip(got, want, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- Gumbel noise


def test_gumbel_noise_is_standard_gumbel_and_follows_the_generator():
    from ecgfm_cli.model.quantizer import gumbel_noise

    like = torch.empty(200_000)
    g = gumbel_noise(like, torch.Generator().manual_seed(0))
    assert g.shape == like.shape and g.dtype == like.dtype
    torch.testing.assert_close(g, gumbel_noise(like, torch.Generator().manual_seed(0)))
    # the CDF exp(-exp(-x)) at a few points (binomial noise ~0.001), mean = Euler's gamma, var = pi^2 / 6
    for x in (-1.5, -0.5, 0.0, 0.5, 1.5, 3.0):
        assert float((g <= x).float().mean()) == pytest.approx(np.exp(-np.exp(-x)), abs=0.004)
    assert float(g.mean()) == pytest.approx(0.5772, abs=0.01)
    assert float(g.var()) == pytest.approx(np.pi**2 / 6, rel=0.02)


def test_straight_through_gumbel_samples_the_softmax():
    """The Gumbel-max trick: the hard sample's code is distributed as softmax(logits / 1), and the forward is
    one-hot while the gradient is the soft sample's."""
    from ecgfm_cli.model.quantizer import gumbel_softmax_hard

    logits = torch.tensor([1.0, 0.0, -1.0, 2.0]).repeat(50_000, 1).requires_grad_()
    hard = gumbel_softmax_hard(logits, 1.0, torch.Generator().manual_seed(1))
    np.testing.assert_allclose(hard.detach().sum(1).numpy(), 1.0, atol=1e-6)
    freq = hard.detach().mean(0)
    torch.testing.assert_close(freq, logits[0].detach().softmax(-1), atol=0.006, rtol=0)
    (hard * torch.arange(4.0)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_code_perplexity_by_counting_equals_the_one_hot_mean():
    from ecgfm_cli.model.quantizer import GumbelVectorQuantizer, _perplexity

    torch.manual_seed(0)
    quant = GumbelVectorQuantizer(16, num_vars=10, groups=2, vq_dim=8).eval()
    x = torch.randn(3, 40, 16)
    _, stats = quant(x)
    logits = quant.weight_proj(x).view(120, 2, 10)
    hard = torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    torch.testing.assert_close(stats["code_perplexity"], _perplexity(hard.mean(0)))
    assert stats["codes"].shape == (3, 40, 2)



# ------------------------------------------------------------------------- padded tokens (Fusions.pad_tokens)


def _dropout_free(seed: int = 0) -> tuple[Wav2Vec2Pretrainer, torch.Tensor, dict]:
    """A tiny pretrainer without dropout (padding changes the shape the dropout masks are drawn over)."""
    torch.manual_seed(seed)
    enc = preset("tiny").with_dropouts(0.0)
    model = Wav2Vec2Pretrainer(enc, PretrainConfig(dropout_features=0.0)).train()
    x = torch.randn(4, 12, 2500, generator=torch.Generator().manual_seed(seed))
    targets = {k: torch.from_numpy(v) for k, v in draw_targets(
        np.random.default_rng(seed), 4, TargetConfig(frames=enc.num_frames(2500))).items()}
    return model, x, targets


@pytest.mark.parametrize("backend", ["default", "math"])
@pytest.mark.parametrize("multiple", [8, 64])
def test_padded_tokens_give_the_same_loss_and_gradients(backend, multiple):
    """156 tokens padded to 160 (or 192) with a key-padding mask: the same loss, transformer output and
    gradients as unpadded, with torch's default attention kernel and with the math one."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, x, targets = _dropout_free()
    outs = {}
    kernel = sdpa_kernel(SDPBackend.MATH) if backend == "math" else contextlib.nullcontext()
    with kernel:
        for pad in (False, True):
            with use_fusions(pad_tokens=pad, pad_multiple=multiple):
                outs[pad] = _loss_and_grads(model, x, targets)
                x_out = model.encoder.contextualize(torch.randn(2, 156, 64, generator=torch.Generator().manual_seed(1)))
            outs[pad] = (*outs[pad], x_out.detach())
    _assert_same(outs[False][:2], outs[True][:2], rtol=1e-4, atol=1e-6)
    assert outs[True][2].shape == (2, 156, 64)
    torch.testing.assert_close(outs[True][2], outs[False][2], rtol=1e-5, atol=1e-6)


def test_padding_reaches_the_transformer_only_and_is_ignored():
    """The positional conv sees the 156 real frames only (padding cannot leak into them through its 16-tap
    kernel); the layers see 160 with the padding masked; whatever the padded tokens hold, the real tokens'
    outputs are the unpadded ones; a caller's own padding mask is kept beside the extra padding."""
    from ecgfm_cli.model.encoder import EcgEncoder

    torch.manual_seed(0)
    enc = EcgEncoder(preset("tiny").with_dropouts(0.0)).eval()
    seen = {}
    hooks = [enc.conv_pos.register_forward_pre_hook(lambda m, a: seen.__setitem__("pos", a[0].shape[1])),
             enc.encoder.layers[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("layer", a[0].shape[1]))]
    h = torch.randn(3, 156, 64)
    own = torch.zeros(3, 156, dtype=torch.bool)
    own[1, 150:] = True
    with use_fusions(pad_tokens=True):
        padded, padded_own = enc.contextualize(h), enc.contextualize(h, own)
    for hook in hooks:
        hook.remove()
    assert seen == {"pos": 156, "layer": 160}
    torch.testing.assert_close(padded, enc.contextualize(h), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(padded_own, enc.contextualize(h, own), rtol=1e-5, atol=1e-6)
    # the transformer itself with garbage in the padded tokens: masked keys, per-token everything else
    z = torch.randn(3, 156, 64)
    garbage = torch.cat([z, 1e3 * torch.randn(3, 4, 64)], dim=1)
    mask = torch.zeros(3, 160, dtype=torch.bool)
    mask[:, 156:] = True
    torch.testing.assert_close(enc.encoder(garbage, mask)[0][:, :156], enc.encoder(z)[0], rtol=1e-5, atol=1e-5)


def test_inference_encoder_is_not_padded():
    """``prepare_for_inference``'s attention takes no mask: with pad_tokens on, the prepared encoder runs
    unpadded (no error), the same embeddings."""
    from ecgfm_cli.model.encoder import EcgEncoder
    from ecgfm_cli.model.inference import prepare_for_inference

    torch.manual_seed(0)
    enc = EcgEncoder(preset("tiny")).eval()
    x = torch.randn(2, 12, 2500)
    with torch.no_grad():
        ref = enc.embed(x)
    prepare_for_inference(enc)
    with use_fusions(pad_tokens=True), torch.no_grad():
        torch.testing.assert_close(enc.embed(x), ref, rtol=1e-4, atol=1e-5)


def test_fusion_settings_with_integer_parameters():
    assert parse_fusions("pad_tokens=1,pad_multiple=16") == {"pad_tokens": True, "pad_multiple": 16}
    with use_fusions(pad_multiple=16) as f:
        assert f.pad_multiple == 16 and isinstance(f.pad_multiple, int)
    assert FUSIONS.pad_multiple == 8
    for text in ("pad_multiple=0", "pad_multiple=x", "pad_multiple"):
        with pytest.raises(ValueError, match="pad_multiple=N, a positive integer"):
            parse_fusions(text)
    with pytest.raises(ValueError, match="positive integer"), use_fusions(pad_multiple=0):
        pass


# ------------------------------------------------------ the heads: tensor temperature, Fusions.compile_heads


def _heads_inputs(model: Wav2Vec2Pretrainer, x: torch.Tensor, seed: int) -> tuple:
    """``model.heads``' inputs for a batch: conv features, transformer output, one draw of masked positions
    (T' differs by seed), negatives and Gumbel noise."""
    tcfg = TargetConfig(frames=model.encoder_cfg.num_frames(x.shape[-1]), num_negatives=model.cfg.num_negatives)
    targets = draw_targets(np.random.default_rng(seed), x.shape[0], tcfg)
    normed, h = model.encoder.project(model.encoder.conv_features(x))
    mask = torch.from_numpy(targets["mask"])
    positions = mask.nonzero()[:, 1].view(x.shape[0], -1)
    noise = model.quantizer.noise(positions.numel(), "cpu", torch.Generator().manual_seed(seed))
    return normed, model.encoder.contextualize(h), positions, torch.from_numpy(targets["negatives_idx"]), noise


def test_temperature_is_an_input_so_the_heads_compile_once():
    """The per-update Gumbel temperature reaches the heads as a 0-d tensor, so torch.compile's guards do not
    change with it: one compiled frame for 3 updates with 3 temperatures and 3 masked counts T' (dynamo with
    its eager backend: the guards are the backend's business, not inductor's)."""
    from torch._dynamo.utils import counters

    model, x, _ = _model_and_batch()
    heads = torch.compile(model.heads, dynamic=True, backend="eager")
    counters.clear()
    seen = set()
    for update, seed in ((0, 1), (100_000, 2), (400_000, 3)):
        model.set_num_updates(update)
        features, x_out, positions, idx, noise = _heads_inputs(model, x, seed)
        tau = model.quantizer.temperature_tensor("cpu")
        logits, contrastive, stats = heads(features, x_out, positions, idx, tau, noise)
        eager = model.heads(features, x_out, positions, idx, tau, noise)
        torch.testing.assert_close(logits, eager[0])
        assert float(stats["temperature"]) == pytest.approx(model.quantizer.temperature)
        seen.add((positions.shape[1], round(float(tau), 4)))
    assert len(seen) == 3
    assert counters["frames"]["ok"] == 1 and not counters["graph_break"], dict(counters["frames"])


def test_temperature_tensor_keeps_the_state_dict_and_follows_the_schedule():
    model, x, targets = _model_and_batch()
    keys = set(model.state_dict())
    model.set_num_updates(200_000)
    out = model(x, torch.arange(4) // 2, **targets, generator=torch.Generator().manual_seed(0))
    assert set(model.state_dict()) == keys and not list(model.buffers())
    assert torch.isfinite(out.loss)
    tau = model.quantizer.temperature_tensor("cpu")
    assert tau.dtype == torch.float32 and tau.shape == () and float(tau) == pytest.approx(2.0 * 0.999995**200_000)


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="torch.compile on CPU needs a C compiler")
def test_compiled_heads_give_the_same_loss_and_gradients_and_compile_once():
    """``Fusions.compile_heads`` (inductor) against eager, with dropout and Gumbel noise on (the noise drawn
    outside the compiled code): the same loss, logits and gradients, for 3 updates with different
    temperatures and masked counts, from one compilation."""
    from torch._dynamo.utils import counters

    model, x, _ = _model_and_batch()
    counters.clear()
    for update, seed in ((0, 1), (100_000, 2), (400_000, 3)):
        model.set_num_updates(update)
        targets = {k: torch.from_numpy(v) for k, v in draw_targets(
            np.random.default_rng(seed), 4, TargetConfig(frames=156)).items()}
        with use_fusions(compile_heads=False):
            eager = _loss_and_grads(model, x, targets)
        try:
            with use_fusions(compile_heads=True):
                compiled = _loss_and_grads(model, x, targets)
        except torch._dynamo.exc.BackendCompilerFailed as e:  # a compiler that inductor cannot use
            pytest.skip(f"torch.compile unavailable here: {e}")
        _assert_same(eager, compiled, rtol=1e-3, atol=1e-5)
    assert counters["frames"]["ok"] == 1 and not counters["graph_break"], dict(counters["frames"])
