"""EcgEncoder: shapes, fairseq key layout, parameter counts, gradients, and parity with transformers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hf_reference import build_hf_model, fairseq_cfg_model, fairseq_to_hf_state, random_fairseq_state

from ecgfm_cli.model.checkpoint import normalize_weight_norm
from ecgfm_cli.model.config import PRESETS, EncoderConfig, preset
from ecgfm_cli.model.encoder import (
    ConvFeatureExtractor,
    EcgClassifier,
    EcgEncoder,
    GradMultiply,
    count_parameters,
    grouped_conv_fft,
)

TINY = preset("tiny").with_dropouts(0.0)


def _meta(cfg: EncoderConfig) -> EcgEncoder:
    with torch.device("meta"):
        return EcgEncoder(cfg)


def _heads_params(cfg: EncoderConfig, groups=2, n_vars=320, vq_dim=256, final_dim=256) -> int:
    """wav2vec 2.0 pretraining heads as in the reference: mask_emb, quantizer, project_q, final_proj."""
    n_codes = groups * n_vars
    return (cfg.embed_dim + (cfg.conv_dim * n_codes + n_codes) + n_codes * (vq_dim // groups)
            + (vq_dim * final_dim + final_dim) + (cfg.embed_dim * final_dim + final_dim))


@pytest.mark.parametrize("t, kernel, groups", [(156, 128, 16), (37, 8, 2), (20, 5, 1)])
def test_fft_positional_conv_equals_the_direct_conv(t, kernel, groups):
    """grouped_conv_fft = Conv1d(padding=K // 2, groups) with the extra frame of an even K dropped, in value and
    in gradient (odd K too)."""
    torch.manual_seed(0)
    d = 8 * groups
    conv = torch.nn.Conv1d(d, d, kernel, padding=kernel // 2, groups=groups).double()
    x = torch.randn(3, t, d, dtype=torch.float64, requires_grad=True)
    direct = conv(x.transpose(1, 2))[..., :t].transpose(1, 2)  # an even K gives one extra frame: drop it
    w = conv.weight.detach().clone().requires_grad_()
    fft = grouped_conv_fft(x, w, conv.bias.detach(), groups)
    assert fft.shape == direct.shape == (3, t, d)
    assert torch.allclose(fft.double(), direct, atol=1e-5)
    g = torch.randn_like(direct)
    gx_direct, gw_direct = torch.autograd.grad(direct, (x, conv.weight), g)
    gx_fft, gw_fft = torch.autograd.grad(fft, (x, w), g.float())
    assert torch.allclose(gx_fft.double(), gx_direct, atol=1e-4)
    assert torch.allclose(gw_fft.double(), gw_direct, atol=1e-4)


def test_conv_stack_as_matmuls_equals_conv1d():
    """The kernel == stride blocks run as matmuls over windows: same values and weight gradients as Conv1d
    (block 0 with its per-channel GroupNorm, a remainder sample dropped as a strided conv drops it)."""
    torch.manual_seed(0)
    fx = ConvFeatureExtractor(12, ((16, 2, 2), (16, 2, 2), (16, 3, 3)))
    x = torch.randn(2, 12, 101)

    def reference(x):
        for block in fx.conv_layers:
            x = block(x)  # the modules themselves: Conv1d, Dropout(0), [GroupNorm], GELU
        return x.transpose(1, 2)

    ours, ref = fx(x), reference(x)
    assert ours.shape == ref.shape == (2, 8, 16)
    assert torch.allclose(ours, ref, atol=1e-5)
    g = torch.randn_like(ref)
    params = [b[0].weight for b in fx.conv_layers] + [fx.conv_layers[0][2].weight]
    for a, b in zip(torch.autograd.grad(ours, params, g), torch.autograd.grad(ref, params, g), strict=True):
        assert torch.allclose(a, b, atol=1e-4)


def test_bfloat16_gelu_is_fairseqs_float32_gelu():
    """The layers' plain GELU on bfloat16 input is bit for bit fairseq's gelu(x.float()).type_as(x), in value
    and gradient, so the encoder need not make float32 copies of its activations."""
    dtype = torch.bfloat16
    torch.manual_seed(0)
    x = (torch.randn(4096) * 4).to(dtype).requires_grad_()
    x32 = x.detach().clone().requires_grad_()
    ours = torch.nn.GELU()(x)
    ref = torch.nn.functional.gelu(x32.float()).type_as(x32)
    assert ours.dtype == dtype and torch.equal(ours, ref)
    g = torch.randn(4096).to(dtype)
    assert torch.equal(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(ref, x32, g)[0])


def test_parameter_counts_match_the_reference():
    base, large = _meta(PRESETS["base"]), _meta(PRESETS["large"])
    # The reference's "90,374,016 encoder-only" includes mask_emb (768), which the pretraining wrapper holds.
    assert count_parameters(base) + 768 == 90_374_016
    assert count_parameters(base) + _heads_params(PRESETS["base"]) == 90_883_072
    assert count_parameters(large) + _heads_params(PRESETS["large"]) == 311_940_352
    assert count_parameters(_meta(PRESETS["tiny"])) < 200_000


@pytest.mark.parametrize("name", ["base", "tiny"])
def test_state_dict_keys_are_the_fairseq_keys(name):
    cfg = PRESETS[name]
    ours = {k: tuple(v.shape) for k, v in _meta(cfg).state_dict().items()}
    with torch.device("meta"):
        official = random_fairseq_state(cfg, pretraining_heads=False)
    official = {k: tuple(v.shape) for k, v in normalize_weight_norm(official).items()}
    assert ours == official
    assert "feature_extractor.conv_layers.0.2.weight" in ours  # GroupNorm at index 2 (Dropout at 1)
    assert ours["conv_pos.pos_conv.0.parametrizations.weight.original0"] == (1, 1, cfg.conv_pos)


def test_shapes_and_api():
    torch.manual_seed(0)
    model = EcgEncoder(TINY).eval()
    x = torch.randn(3, 12, 2500)
    feats = model.conv_features(x)
    assert feats.shape == (3, 156, TINY.conv_dim) and TINY.num_frames(2500) == 156
    normed, h = model.project(feats)
    assert normed.shape == feats.shape and h.shape == (3, 156, TINY.embed_dim)
    out = model.contextualize(h)
    torch.testing.assert_close(out, model(x))
    torch.testing.assert_close(model.embed(x), out.mean(1))
    assert model(torch.randn(1, 12, 5000)).shape == (1, 312, TINY.embed_dim)

    out2, attn = model.forward_with_attention(x)
    torch.testing.assert_close(out2, out, atol=1e-5, rtol=1e-5)
    assert attn.shape == (3, TINY.layers, 156, 156)
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, TINY.layers, 156))

    pad = torch.zeros(3, 156, dtype=torch.bool)
    pad[0, 100:] = True
    masked = model.contextualize(h, pad)
    assert torch.isfinite(masked).all()
    torch.testing.assert_close(masked[1:], out[1:])


def test_classifier_layout_and_pooling():
    torch.manual_seed(0)
    clf = EcgClassifier(TINY, n_labels=5).eval()
    keys = set(clf.state_dict())
    assert {"proj.weight", "proj.bias"} <= keys
    assert keys - {"proj.weight", "proj.bias"} == {"encoder." + k for k in clf.encoder.state_dict()}
    x = torch.randn(2, 12, 800)
    torch.testing.assert_close(clf(x), clf.proj(clf.encoder.embed(x)))
    assert clf(x).shape == (2, 5) and clf.n_labels == 5


def test_grad_multiply_and_feature_grad_mult():
    x = torch.randn(4, requires_grad=True)
    GradMultiply.apply(x, 0.25).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((4,), 0.25))

    torch.manual_seed(0)
    ref = EcgEncoder(TINY)
    x = torch.randn(2, 12, 320)

    def conv_grad(mult: float):
        model = EcgEncoder(dataclasses.replace(TINY, feature_grad_mult=mult))
        model.load_state_dict(ref.state_dict())
        model(x).square().sum().backward()
        return model.feature_extractor.conv_layers[0][0].weight.grad, model.post_extract_proj.weight.grad

    g1, p1 = conv_grad(1.0)
    g01, p01 = conv_grad(0.1)
    g0, p0 = conv_grad(0.0)
    torch.testing.assert_close(g01, 0.1 * g1)
    torch.testing.assert_close(p01, p1)
    assert g0 is None and p0 is not None


def test_config_dict_round_trip_and_presets():
    for cfg in PRESETS.values():
        assert EncoderConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="bogus"):
        EncoderConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="unknown model size"):
        preset("huge")
    with pytest.raises(ValueError, match="divisible"):
        EncoderConfig(embed_dim=100, heads=12)
    assert preset("tiny", layers=3).layers == 3


def test_from_fairseq_reads_cfg_but_shapes_win():
    state = random_fairseq_state(TINY)
    stale = fairseq_cfg_model(PRESETS["large"])  # stale side config: 1024 / 24 layers
    stale["encoder_attention_heads"] = 4
    cfg = EncoderConfig.from_fairseq(stale, state)
    assert (cfg.embed_dim, cfg.layers, cfg.ffn_dim, cfg.conv_layers) == (64, 2, 128, TINY.conv_layers)
    assert (cfg.conv_pos, cfg.conv_pos_groups, cfg.heads, cfg.in_channels) == (16, 4, 4, 12)
    assert EncoderConfig.from_fairseq(fairseq_cfg_model(TINY), state) == TINY
    # nested pretraining cfg (finetuned files) and a prefixed state; heads fall back to D // 64 without cfg
    prefixed = {"encoder." + k: v for k, v in state.items()}
    nested = {"_name": "ecg_transformer_classifier", "w2v_args": {"model": fairseq_cfg_model(TINY)}}
    assert EncoderConfig.from_fairseq(nested, prefixed).heads == 4
    assert EncoderConfig.from_fairseq({}, prefixed).heads == 1
    with pytest.raises(ValueError, match="pre-LN"):
        EncoderConfig.from_fairseq({"layer_norm_first": True}, state)


def _parity(cfg: EncoderConfig, batch: int, length: int, seed: int) -> float:
    state = random_fairseq_state(cfg, seed=seed)
    ours = EcgEncoder(cfg.with_dropouts(0.0)).eval()
    ours.load_state_dict(
        {k: v for k, v in normalize_weight_norm(state).items() if k not in
         {"mask_emb", "quantizer.vars", "quantizer.weight_proj.weight", "quantizer.weight_proj.bias",
          "project_q.weight", "project_q.bias", "final_proj.weight", "final_proj.bias"}},
        strict=True,
    )
    hf = build_hf_model(cfg)
    hf_state = fairseq_to_hf_state({k: v for k, v in state.items() if k != "mask_emb"
                                    and not k.startswith(("quantizer.", "project_q.", "final_proj."))})
    hf.load_state_dict(hf_state, strict=True)
    x = torch.randn(batch, cfg.in_channels, length, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        a = ours(x)
        b = hf(x).last_hidden_state
    assert a.shape == b.shape == (batch, cfg.num_frames(length), cfg.embed_dim)
    assert a.std() > 0.1  # a real signal, not a collapsed output
    return (a - b).abs().max().item()


@pytest.mark.slow  # ~3 s of work, plus transformers' import (5-10 s) when it runs first
def test_parity_with_transformers_base():
    assert _parity(PRESETS["base"], batch=2, length=2500, seed=0) <= 1e-4


@pytest.mark.parametrize("length", [2500, 1000])
def test_parity_with_transformers_tiny(length):
    assert _parity(TINY, batch=3, length=length, seed=1) <= 1e-4


def test_parity_with_transformers_pretraining_heads_map():
    """The key mapping also covers Wav2Vec2ForPreTraining (used by the pretraining-loss test)."""
    state = random_fairseq_state(TINY, latent_vars=8, latent_dim=32, final_dim=16)
    hf = build_hf_model(TINY, pretraining=True, latent_vars=8, latent_dim=32, final_dim=16)
    hf.load_state_dict(fairseq_to_hf_state(state, prefix="wav2vec2."), strict=True)
