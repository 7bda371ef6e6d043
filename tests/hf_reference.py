"""Independent reference for the ECG-FM encoder: transformers' wav2vec 2.0 configured like ECG-FM.

Test-only helper (transformers is a test dependency; ``ecgfm_cli`` never imports it). Public API:

* :func:`hf_config` / :func:`build_hf_model`: a ``Wav2Vec2Model`` (or ``Wav2Vec2ForPreTraining``) with
  ECG-FM's sizes, all dropouts 0, whose first conv takes ``in_channels`` leads instead of 1 channel.
  Call the model with ``input_values`` of shape (B, in_channels, L); ``last_hidden_state`` is (B, T, D).
* :func:`fairseq_to_hf_state`: rename a fairseq-signals pretrained state dict (the official key layout,
  unprefixed, either weight-norm naming) to transformers' keys.
* :func:`random_fairseq_state`: a random state dict in the official pretrained layout (tests write it
  with ``torch.save`` to fake a downloaded checkpoint), and :func:`fairseq_cfg_model` its ``cfg["model"]``.

Mapping notes: transformers' ``feature_projection`` = fairseq ``layer_norm`` + ``post_extract_proj``;
its encoder adds ``pos_conv_embed`` and then applies ``encoder.layer_norm`` (post-LN model), exactly
fairseq's order; ``masked_spec_embed`` is fairseq's ``mask_emb``; in ``Wav2Vec2ForPreTraining``
``quantizer.codevectors`` = ``quantizer.vars`` and ``project_hid`` = ``final_proj``.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ecgfm_cli.model.config import EncoderConfig

_LAYER_RENAMES = {
    "self_attn.q_proj": "attention.q_proj",
    "self_attn.k_proj": "attention.k_proj",
    "self_attn.v_proj": "attention.v_proj",
    "self_attn.out_proj": "attention.out_proj",
    "self_attn_layer_norm": "layer_norm",
    "fc1": "feed_forward.intermediate_dense",
    "fc2": "feed_forward.output_dense",
    "final_layer_norm": "final_layer_norm",
}


def hf_config(cfg: EncoderConfig, pretraining: bool = False, latent_groups: int = 2,
              latent_vars: int = 320, latent_dim: int = 256, final_dim: int = 256):
    """A ``Wav2Vec2Config`` equal to ``cfg`` in function, with every dropout 0 and no masking.

    ``pretraining`` also sizes the quantizer (``latent_groups`` x ``latent_vars`` codewords, total
    codeword width ``latent_dim``) and the ``final_dim`` projections, and enables ``masked_spec_embed``
    (mask_time_prob > 0; only used when mask indices are passed in).
    """
    from transformers import Wav2Vec2Config

    return Wav2Vec2Config(
        conv_dim=tuple(c for c, _, _ in cfg.conv_layers),
        conv_kernel=tuple(k for _, k, _ in cfg.conv_layers),
        conv_stride=tuple(s for _, _, s in cfg.conv_layers),
        conv_bias=False,
        feat_extract_norm="group",
        feat_extract_activation="gelu",
        do_stable_layer_norm=False,
        num_conv_pos_embeddings=cfg.conv_pos,
        num_conv_pos_embedding_groups=cfg.conv_pos_groups,
        hidden_size=cfg.embed_dim,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        intermediate_size=cfg.ffn_dim,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        hidden_dropout=0.0,
        activation_dropout=0.0,
        attention_dropout=0.0,
        feat_proj_dropout=0.0,
        feat_quantizer_dropout=0.0,
        final_dropout=0.0,
        layerdrop=0.0,
        mask_time_prob=0.05 if pretraining else 0.0,
        mask_feature_prob=0.0,
        num_codevector_groups=latent_groups,
        num_codevectors_per_group=latent_vars,
        codevector_dim=latent_dim,
        proj_codevector_dim=final_dim,
    )


def build_hf_model(cfg: EncoderConfig, pretraining: bool = False, **head_sizes) -> nn.Module:
    """``Wav2Vec2Model`` (or ``Wav2Vec2ForPreTraining`` if ``pretraining``) for ``cfg``, in eval mode.

    Its first conv is replaced by ``Conv1d(in_channels, conv_dim0, k, s, bias=False)``; transformers'
    feature encoder inserts a channel axis (``input_values[:, None]``), which a forward pre-hook on that
    conv squeezes away again, so the unmodified ``forward`` accepts (B, in_channels, L).
    """
    from transformers import Wav2Vec2ForPreTraining, Wav2Vec2Model

    config = hf_config(cfg, pretraining=pretraining, **head_sizes)
    model = Wav2Vec2ForPreTraining(config) if pretraining else Wav2Vec2Model(config)
    base = model.wav2vec2 if pretraining else model
    ch, kernel, stride = cfg.conv_layers[0]
    conv = nn.Conv1d(cfg.in_channels, ch, kernel, stride=stride, bias=False)
    conv.register_forward_pre_hook(_squeeze_channel_axis)
    base.feature_extractor.conv_layers[0].conv = conv
    return model.eval()


def _squeeze_channel_axis(module: nn.Module, args: tuple) -> tuple | None:
    x = args[0]
    return (x.squeeze(1),) + tuple(args[1:]) if x.dim() == 4 else None


def fairseq_to_hf_state(fairseq_state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Rename the official (unprefixed) fairseq-signals pretrained keys to transformers' keys.

    Encoder keys map to ``Wav2Vec2Model`` names (with ``prefix``, e.g. ``"wav2vec2."`` for
    ``Wav2Vec2ForPreTraining``); ``mask_emb`` -> ``masked_spec_embed``. Pretraining heads map to
    ``Wav2Vec2ForPreTraining`` names (never prefixed): ``quantizer.vars`` -> ``quantizer.codevectors``,
    ``quantizer.weight_proj.*``, ``project_q.*``, ``final_proj.*`` -> ``project_hid.*``. The pos-conv
    weight norm may be ``weight_g/weight_v`` or ``parametrizations.weight.original0/1``. Keys with no
    counterpart (``target_glu.*``) raise ``KeyError``: a caller must decide to drop them.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in fairseq_state.items():
        out[_hf_key(key, prefix)] = value
    return out


def _hf_key(key: str, prefix: str) -> str:
    heads = {
        "quantizer.vars": "quantizer.codevectors",
        "quantizer.weight_proj.weight": "quantizer.weight_proj.weight",
        "quantizer.weight_proj.bias": "quantizer.weight_proj.bias",
    }
    if key in heads:
        return heads[key]
    if m := re.fullmatch(r"(project_q|final_proj)\.(weight|bias)", key):
        return ("project_hid" if m.group(1) == "final_proj" else "project_q") + "." + m.group(2)
    if key == "mask_emb":
        return prefix + "masked_spec_embed"
    if m := re.fullmatch(r"feature_extractor\.conv_layers\.(\d+)\.(0|2)\.(weight|bias)", key):
        part = "conv" if m.group(2) == "0" else "layer_norm"
        return f"{prefix}feature_extractor.conv_layers.{m.group(1)}.{part}.{m.group(3)}"
    if m := re.fullmatch(r"layer_norm\.(weight|bias)", key):
        return f"{prefix}feature_projection.layer_norm.{m.group(1)}"
    if m := re.fullmatch(r"post_extract_proj\.(weight|bias)", key):
        return f"{prefix}feature_projection.projection.{m.group(1)}"
    if m := re.fullmatch(r"conv_pos\.pos_conv\.0\.(.+)", key):
        name = {
            "weight_g": "parametrizations.weight.original0",
            "weight_v": "parametrizations.weight.original1",
        }.get(m.group(1), m.group(1))
        return f"{prefix}encoder.pos_conv_embed.conv.{name}"
    if m := re.fullmatch(r"encoder\.layer_norm\.(weight|bias)", key):
        return f"{prefix}encoder.layer_norm.{m.group(1)}"
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
    if m and m.group(2) in _LAYER_RENAMES:
        return f"{prefix}encoder.layers.{m.group(1)}.{_LAYER_RENAMES[m.group(2)]}.{m.group(3)}"
    raise KeyError(f"no transformers counterpart for fairseq key {key!r}")


def fairseq_cfg_model(cfg: EncoderConfig, name: str = "wav2vec2_cmsc", **extra) -> dict:
    """A fairseq-signals ``cfg["model"]`` dict describing ``cfg`` (as in the released checkpoint)."""
    layers = cfg.conv_layers
    spec = f"[{layers[0]}] * {len(layers)}" if len(set(layers)) == 1 else str(list(layers))
    return {
        "_name": name,
        "encoder_layers": cfg.layers,
        "encoder_embed_dim": cfg.embed_dim,
        "encoder_attention_heads": cfg.heads,
        "encoder_ffn_embed_dim": cfg.ffn_dim,
        "layer_norm_first": False,
        "conv_feature_layers": spec,
        "conv_pos": cfg.conv_pos,
        "conv_pos_groups": cfg.conv_pos_groups,
        "in_d": cfg.in_channels,
        "extractor_mode": "default",
        "conv_bias": False,
        "normalize": False,
        "final_dim": 256,
        "dropout": cfg.dropout,
        "attention_dropout": cfg.attention_dropout,
        "activation_dropout": cfg.activation_dropout,
        "dropout_input": cfg.dropout_input,
        "feature_grad_mult": cfg.feature_grad_mult,
        **extra,
    }


def random_fairseq_state(
    cfg: EncoderConfig,
    pretraining_heads: bool = True,
    weight_norm: str = "g_v",
    latent_groups: int = 2,
    latent_vars: int = 320,
    latent_dim: int = 256,
    final_dim: int = 256,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random float32 tensors with the official pretrained keys and shapes (reference section 5).

    ``weight_norm``: ``"g_v"`` (``weight_g``/``weight_v``, old torch) or ``"parametrizations"``
    (``parametrizations.weight.original0/1``). Scales are BERT-like so activations stay O(1).
    ``pretraining_heads`` adds ``mask_emb``, ``quantizer.*``, ``project_q.*``, ``final_proj.*``.
    """
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def ln(dim: int, name: str) -> dict[str, torch.Tensor]:
        return {f"{name}.weight": 1.0 + rnd(dim, std=0.1), f"{name}.bias": rnd(dim, std=0.1)}

    d, c = cfg.embed_dim, cfg.conv_dim
    s: dict[str, torch.Tensor] = {}
    if pretraining_heads:
        s["mask_emb"] = torch.rand(d, generator=g)
    ch_in = cfg.in_channels
    for i, (ch, k, _) in enumerate(cfg.conv_layers):
        s[f"feature_extractor.conv_layers.{i}.0.weight"] = rnd(ch, ch_in, k, std=(2.0 / (ch_in * k)) ** 0.5)
        if i == 0:
            s.update(ln(ch, "feature_extractor.conv_layers.0.2"))
        ch_in = ch
    s.update(ln(c, "layer_norm"))
    s["post_extract_proj.weight"] = rnd(d, c, std=c**-0.5)
    s["post_extract_proj.bias"] = rnd(d)
    g_name, v_name = (("weight_g", "weight_v") if weight_norm == "g_v"
                      else ("parametrizations.weight.original0", "parametrizations.weight.original1"))
    s[f"conv_pos.pos_conv.0.{g_name}"] = 0.5 + torch.rand(1, 1, cfg.conv_pos, generator=g)
    s[f"conv_pos.pos_conv.0.{v_name}"] = rnd(d, d // cfg.conv_pos_groups, cfg.conv_pos, std=1.0)
    s["conv_pos.pos_conv.0.bias"] = rnd(d)
    s.update(ln(d, "encoder.layer_norm"))
    for i in range(cfg.layers):
        p = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s[f"{p}self_attn.{proj}.weight"] = rnd(d, d, std=d**-0.5)
            s[f"{p}self_attn.{proj}.bias"] = rnd(d)
        s.update(ln(d, p + "self_attn_layer_norm"))
        s[p + "fc1.weight"] = rnd(cfg.ffn_dim, d, std=d**-0.5)
        s[p + "fc1.bias"] = rnd(cfg.ffn_dim)
        s[p + "fc2.weight"] = rnd(d, cfg.ffn_dim, std=cfg.ffn_dim**-0.5)
        s[p + "fc2.bias"] = rnd(d)
        s.update(ln(d, p + "final_layer_norm"))
    if pretraining_heads:
        n_codes = latent_groups * latent_vars
        s["quantizer.vars"] = torch.rand(1, n_codes, latent_dim // latent_groups, generator=g)
        s["quantizer.weight_proj.weight"] = rnd(n_codes, c, std=1.0)
        s["quantizer.weight_proj.bias"] = torch.zeros(n_codes)
        s["project_q.weight"] = rnd(final_dim, latent_dim, std=latent_dim**-0.5)
        s["project_q.bias"] = rnd(final_dim)
        s["final_proj.weight"] = rnd(final_dim, d, std=d**-0.5)
        s["final_proj.bias"] = rnd(final_dim)
    return s


def to_finetuned_layout(
    pretrained_state: dict[str, torch.Tensor], n_labels: int, seed: int = 1
) -> dict[str, torch.Tensor]:
    """Official finetuned layout: encoder keys prefixed ``encoder.``, heads dropped, ``proj.*`` added."""
    g = torch.Generator().manual_seed(seed)
    heads = ("mask_emb", "quantizer.", "project_q.", "final_proj.", "target_glu.")
    out = {"encoder." + k: v for k, v in pretrained_state.items() if not k.startswith(heads)}
    d = pretrained_state["post_extract_proj.weight"].shape[0]
    out["proj.weight"] = torch.randn(n_labels, d, generator=g) * d**-0.5
    out["proj.bias"] = torch.randn(n_labels, generator=g) * 0.1
    return out
