"""The ECG-FM encoder (wav2vec 2.0 "ECGTransformer") in plain PyTorch, layer for layer as released.

Module names are a contract: ``EcgEncoder().state_dict()`` has exactly the fairseq-signals pretrained
encoder keys (``feature_extractor.conv_layers.0.0.weight``, ``layer_norm.*``, ``post_extract_proj.*``,
``conv_pos.pos_conv.0.*``, ``encoder.layer_norm.*``, ``encoder.layers.{i}.self_attn.q_proj.*`` ...), so
official weights load without renaming (weight-norm namings aside, see ``checkpoint.py``).

The positional conv keeps torch's weight-norm parametrisation (``dim=2``), so its keys are
``conv_pos.pos_conv.0.parametrizations.weight.original0`` (g, shape (1, 1, K)) and ``...original1``
(v, shape (D, D/groups, K)) and training it behaves as in fairseq.

This module tree is the only forward there is: ``ecgfm embed`` and finetune's predictions run it after
:func:`~ecgfm_cli.model.inference.prepare_for_inference` has swapped some of its leaves (linears, attention,
positional conv) for fused inference forms of the same function, in place.

Shapes: B batch, C in_channels (leads), L samples, T tokens (L // 16 for ECG-FM), D embed_dim.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ecgfm_cli.model.config import EncoderConfig


@dataclass
class Fusions:
    """Which fused forms the module tree computes with: each is the same function as the plain form (equal to
    float32 rounding, tested with and without in tests/test_fusions.py) and can be switched off to measure it
    (``benchmarks/gpu_pretrain_mfu.py --fusions``, ``bench_pretrain_step.py --ab``).

    ``group_norm``: the conv stack's block-0 GroupNorm as one ``F.group_norm`` over a channels-last view
    (one fused kernel forward and backward) instead of :func:`channel_norm`'s elementwise passes: a CPU
    ``small`` update ~4 % faster (docs/performance.md).
    ``qkv``: one ``(3D x D)`` q/k/v projection from the concatenated weights (state-dict keys unchanged)
    instead of three: no gain on CPU (the attention backward's copies eat it), off until measured on a GPU.
    ``pad_tokens``: the transformer runs on the token sequence zero-padded at the end to a multiple of
    ``pad_multiple`` (ECG-FM's 156 -> 160), the padding masked out as attention keys and cut off its output
    (:meth:`EcgEncoder.contextualize`): matmul row counts that tensor cores tile without a ragged edge. The
    positional conv runs before the padding, on the real frames only. Same outputs and gradients to float32
    rounding; with dropout on, the masks are drawn over the padded shape (other draws, the same distribution).
    The key-padding mask may rule out some GPU attention kernels, so it is off until measured on a GPU. An
    encoder prepared for inference (its attention takes no mask) is not padded.
    ``compile_heads``: the pretraining heads (Gumbel quantizer, target and prediction projections, contrastive
    logits and InfoNCE) run as one ``torch.compile``-d function, compiled once per model (see
    :meth:`~ecgfm_cli.model.pretraining.Wav2Vec2Pretrainer.heads`). A switch here rather than part of
    ``--compile``: the switches are measured one at a time on a GPU before a default changes, and this one
    has not been (on CPU it is no faster, docs/performance.md).
    """

    group_norm: bool = True
    qkv: bool = False
    pad_tokens: bool = False
    pad_multiple: int = 8
    compile_heads: bool = False


#: The process-wide switches (read at every forward; under ``torch.compile`` they are guarded, so a change
#: recompiles). Set them with :func:`use_fusions`.
FUSIONS = Fusions()


def _field_types() -> dict[str, type]:
    """Each :class:`Fusions` field's type (``bool`` switches, ``int`` parameters), from its default."""
    return {f.name: type(f.default) for f in dataclasses.fields(Fusions)}


@contextlib.contextmanager
def use_fusions(**flags: bool | int) -> Iterator[Fusions]:
    """Set :data:`FUSIONS` fields (``group_norm=False``, ``pad_multiple=16``, ...) for a ``with`` block."""
    types = _field_types()
    unknown = set(flags) - set(types)
    if unknown:
        raise ValueError(f"unknown fusion(s) {', '.join(sorted(unknown))}; known: {', '.join(types)}")
    bad = [f"{k}={v}" for k, v in flags.items() if types[k] is int and int(v) < 1]
    if bad:
        raise ValueError(f"fusion setting {', '.join(bad)}: expected a positive integer")
    old = dataclasses.replace(FUSIONS)
    for name, value in flags.items():
        setattr(FUSIONS, name, types[name](value))
    try:
        yield FUSIONS
    finally:
        for f in dataclasses.fields(Fusions):
            setattr(FUSIONS, f.name, getattr(old, f.name))


def parse_fusions(text: str) -> dict[str, bool | int]:
    """``"group_norm=0,qkv=1,pad_multiple=16"`` -> ``{"group_norm": False, "qkv": True, "pad_multiple": 16}``
    (the benchmarks' ``--fusions``): ``0``/``1`` for a switch, a positive integer for an integer parameter."""
    types = _field_types()
    out: dict[str, bool | int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if types.get(name) is int:
            if not (sep and value.isdigit() and int(value) > 0):
                raise ValueError(f"fusion setting {item!r}: expected {name}=N, a positive integer")
            out[name] = int(value)
            continue
        if not sep or value not in ("0", "1"):
            raise ValueError(f"fusion setting {item!r}: expected NAME=0 or NAME=1")
        out[name] = value == "1"
    return out


def padded_length(frames: int, multiple: int) -> int:
    """``frames`` rounded up to a multiple of ``multiple`` (156, 8 -> 160)."""
    return -(-frames // multiple) * multiple


class GradMultiply(torch.autograd.Function):
    """Identity in the forward pass; multiplies the incoming gradient by ``scale`` in the backward pass."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None


class ConvFeatureExtractor(nn.Module):
    """Strided conv stack: (B, C, L) -> (B, T, conv_dim), channels-last.

    Block i is ``Sequential(Conv1d(no bias), Dropout(0), [GroupNorm(ch, ch) only in block 0], GELU)``;
    the Dropout(0) placeholder keeps fairseq's key indices (``conv_layers.0.2`` is the GroupNorm).

    The stack runs channels-last (:func:`conv_channels_last`), so no transposes between blocks. The block-0
    GroupNorm (one group per channel: each channel normalised over time) is computed in float32 on that
    layout, as fairseq's ``Fp32GroupNorm``; each block ends with its GELU module (``block[-1]``).
    """

    def __init__(self, in_channels: int, conv_layers: tuple[tuple[int, int, int], ...]):
        super().__init__()
        blocks = []
        ch_in = in_channels
        for i, (ch, kernel, stride) in enumerate(conv_layers):
            conv = nn.Conv1d(ch_in, ch, kernel, stride=stride, bias=False)
            nn.init.kaiming_normal_(conv.weight)
            parts: list[nn.Module] = [conv, nn.Dropout(0.0)]
            if i == 0:  # holds the affine parameters; forward computes it with channel_norm, in float32
                parts.append(nn.GroupNorm(ch, ch, affine=True))
            parts.append(nn.GELU())
            blocks.append(nn.Sequential(*parts))
            ch_in = ch
        self.conv_layers = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Tensor:
        h = x.transpose(1, 2)  # (B, L, C)
        for i, block in enumerate(self.conv_layers):
            h = conv_channels_last(block[0], h)
            if i == 0:
                gn = block[2]
                h = channel_norm(h, gn.weight, gn.bias, gn.eps)
            h = block[-1](h)
        return h


def conv_channels_last(conv: nn.Module, h: Tensor) -> Tensor:
    """A bias-free ``Conv1d`` on channels-last ``h (B, L, C_in)`` -> ``(B, L', C_out)``.

    A conv whose kernel equals its stride (all of ECG-FM's) sees non-overlapping windows, so it runs as one
    matmul over :func:`conv_windows`: the same function as ``Conv1d``, without im2col (cuDNN's bf16 kernels
    for such 2-tap convs are slow, see docs/performance.md). A module that is not a ``Conv1d`` is the inference
    form :func:`~ecgfm_cli.model.inference.prepare_for_inference` put in its place, and takes ``h`` itself.
    """
    if not isinstance(conv, nn.Conv1d):
        return conv(h)
    kernel, stride = conv.kernel_size[0], conv.stride[0]
    if kernel == stride:
        return F.linear(conv_windows(h, kernel), window_weight(conv.weight))
    return conv(h.transpose(1, 2)).transpose(1, 2)


def conv_windows(h: Tensor, kernel: int) -> Tensor:
    """Channels-last ``h (B, L, C)`` -> ``(B, L // kernel, kernel * C)`` non-overlapping windows, rows ordered
    (tap, channel); a trailing remainder is dropped, as a conv with stride == kernel drops it."""
    t = h.shape[1] // kernel
    return h[:, : t * kernel].reshape(h.shape[0], t, kernel * h.shape[2])


def window_weight(weight: Tensor) -> Tensor:
    """A ``Conv1d`` weight ``(out, in, kernel)`` as the ``(out, kernel * in)`` matrix that multiplies
    :func:`conv_windows` rows (tap, channel)."""
    return weight.permute(0, 2, 1).reshape(weight.shape[0], -1)


def channel_norm(h: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """``GroupNorm(C, C)`` of a channels-last ``h (B, T, C)``: each channel normalised over time, computed in
    float32 (fairseq's ``Fp32GroupNorm``) and returned in ``h``'s dtype, channels-last.

    With :data:`FUSIONS` ``.group_norm`` one ``F.group_norm`` over ``h`` viewed as a channels-last
    ``(B, C, 1, T)`` image (one kernel each way, no layout copy); otherwise the elementwise form below."""
    if FUSIONS.group_norm:
        x4 = h.float().transpose(1, 2).unsqueeze(2).contiguous(memory_format=torch.channels_last)
        y = F.group_norm(x4, h.shape[2], weight.float(), bias.float(), eps)
        return y.squeeze(2).transpose(1, 2).to(h.dtype)
    hf = h.float()
    # two passes of mean() instead of var_mean(), whose reduction over a non-last dim is slower on CPU
    mean = hf.mean(dim=1, keepdim=True)
    var = (hf - mean).square().mean(dim=1, keepdim=True)
    scale = torch.rsqrt(var + eps) * weight.float()
    return torch.addcmul(bias.float() - mean * scale, hf, scale).to(h.dtype)


def fft_length(frames: int, kernel: int) -> int:
    """FFT length for :func:`grouped_conv_fft`: a power of two >= ``frames + kernel // 2``."""
    return 1 << (frames + kernel // 2 - 1).bit_length()


def kernel_spectrum(weight: Tensor, groups: int, n: int) -> Tensor:
    """``weight (D, D / groups, K)`` -> ``(groups, n // 2 + 1, C_out, C_in)`` complex64 conjugate spectra."""
    d, c, _ = weight.shape
    wf = torch.conj(torch.fft.rfft(weight.float(), n=n))  # (D, C, F)
    return wf.view(groups, d // groups, c, -1).permute(0, 3, 1, 2)


def grouped_conv_fft(x: Tensor, weight: Tensor, bias: Tensor, groups: int, spectrum: Tensor | None = None) -> Tensor:
    """ECG-FM's positional conv as a product of spectra: (B, T, D) -> (B, T, D) float32.

    Same function as ``Conv1d(D, D, K, padding=K // 2, groups=groups)`` followed by dropping the last frame
    when K is even: ``out[t] = bias + sum_k w[k] x[t + k - K // 2]`` per group (equal to ~1e-6). The direct
    128-tap grouped conv runs far below matmul speed on CPU and GPU; here it is float32 FFTs and one small
    complex matmul per frequency and group. Differentiable.

    ``weight`` is ``(D, D / groups, K)``, ``bias`` ``(D,)``; ``spectrum``, optional, is
    ``kernel_spectrum(weight, groups, fft_length(T, K))`` computed once (inference, where weights are fixed).
    A circular cross-correlation of length ``n >= T + K // 2``: the wrapped indices land on zero padding.
    """
    b, t, d = x.shape
    half = weight.shape[-1] // 2
    n = fft_length(t, weight.shape[-1])
    with torch.autocast(x.device.type, enabled=False):
        wf = kernel_spectrum(weight, groups, n) if spectrum is None else spectrum  # (G, F, C_out, C_in)
        xf = torch.fft.rfft(x.float().transpose(1, 2), n=n)  # (B, D, F)
        xf = xf.view(b, groups, d // groups, -1).permute(1, 3, 2, 0)  # (G, F, C_in, B)
        yf = torch.matmul(wf, xf).permute(3, 0, 2, 1).reshape(b, d, -1)
        y = torch.fft.irfft(yf, n=n).roll(half, dims=-1)[..., :t]  # y[t] = corr[(t - K // 2) mod n]
        return (y + bias.float()[:, None]).transpose(1, 2)


class ConvPositionalEmbedding(nn.Module):
    """(B, T, D) -> (B, T, D) = GELU(weight-normed grouped Conv1d(x), last frame dropped for an even kernel);
    the caller ADDS it to x.

    ``pos_conv`` is ``Sequential(conv)`` so the weights keep fairseq's keys (``pos_conv.0.*``); the forward
    computes the conv with :func:`grouped_conv_fft`, in float32, and returns the input's dtype.
    """

    def __init__(self, dim: int, kernel: int, groups: int):
        super().__init__()
        conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups)
        nn.init.normal_(conv.weight, mean=0.0, std=math.sqrt(4.0 / (kernel * dim)))
        nn.init.zeros_(conv.bias)
        conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self.pos_conv = nn.Sequential(conv)

    def forward(self, x: Tensor) -> Tensor:
        conv = self.pos_conv[0]
        return F.gelu(grouped_conv_fft(x, conv.weight, conv.bias, conv.groups)).to(x.dtype)


def residual(h: Tensor, x: Tensor) -> Tensor:
    """``h + x``; added into ``h`` (a fresh activation) when autograd records nothing and the sum keeps
    ``h``'s dtype, which saves one (B, T, D) allocation per residual at inference."""
    if torch.is_grad_enabled() or torch.promote_types(h.dtype, x.dtype) != h.dtype:
        return h + x
    return h.add_(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections (fairseq key names)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(
        self, x: Tensor, padding_mask: Tensor | None = None, need_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """x (B, T, D), padding_mask (B, T) True = padded -> (out (B, T, D), head-averaged
        attention probabilities (B, T, T) when ``need_weights`` else None)."""
        b, t, d = x.shape
        if FUSIONS.qkv:  # (B, T, 3, H, hd) -> three (B, H, T, hd) views; unbind's backward stacks once
            w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
            bias = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
            q, k, v = F.linear(x, w, bias).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (p(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
                       for p in (self.q_proj, self.k_proj, self.v_proj))
        mask = None if padding_mask is None else ~padding_mask[:, None, None, :]
        p_drop = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            probs = scores.float().softmax(-1).type_as(q)
            weights = probs.mean(1)
            out = F.dropout(probs, p_drop, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_drop)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d)), weights


class TransformerLayer(nn.Module):
    """Post-LN block: x = LN(x + drop(MHA(x))); x = LN(x + drop(fc2(drop_act(GELU(fc1(x))))))."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d = cfg.embed_dim
        self.self_attn = SelfAttention(d, cfg.heads, cfg.attention_dropout)
        self.dropout1 = nn.Dropout(cfg.dropout)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.ffn_dim)
        # fairseq computes this GELU in float32 (gelu(x.float()).type_as(x)); torch's bfloat16 GELU already
        # computes in float32 and rounds once, bit for bit the same (tested; float16 within one rounding),
        # without a float32 copy of the (B, T, ffn_dim) activations
        self.activation = nn.GELU()
        self.dropout2 = nn.Dropout(cfg.activation_dropout)
        self.fc2 = nn.Linear(cfg.ffn_dim, d)
        self.dropout3 = nn.Dropout(cfg.dropout)
        self.final_layer_norm = nn.LayerNorm(d)

    def forward(
        self, x: Tensor, padding_mask: Tensor | None = None, need_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        attn, weights = self.self_attn(x, padding_mask, need_weights)
        x = self.self_attn_layer_norm(residual(self.dropout1(attn), x))
        h = self.fc2(self.dropout2(self.activation(self.fc1(x))))
        x = self.final_layer_norm(residual(self.dropout3(h), x))
        return x, weights


class TransformerEncoder(nn.Module):
    """Input LayerNorm + dropout, then post-LN layers; no output LayerNorm. (B, T, D) -> (B, T, D)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.layer_norm = nn.LayerNorm(cfg.embed_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.layers))
        for module in self.layers.modules():
            if isinstance(module, nn.Linear):  # BERT init, as fairseq's init_bert_params
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(
        self, x: Tensor, padding_mask: Tensor | None = None, need_weights: bool = False
    ) -> tuple[Tensor, list[Tensor]]:
        x = self.dropout(self.layer_norm(x))
        maps = []
        for layer in self.layers:
            x, weights = layer(x, padding_mask, need_weights)
            if weights is not None:
                maps.append(weights)
        return x, maps


class EcgEncoder(nn.Module):
    """ECG-FM encoder: (B, in_channels, L) -> (B, T, D) contextual token embeddings.

    A 12 x 2500 input (5 s at 500 Hz) gives 156 x 768 with the ``base`` config.
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.feature_extractor = ConvFeatureExtractor(cfg.in_channels, cfg.conv_layers)
        self.layer_norm = nn.LayerNorm(cfg.conv_dim)
        self.post_extract_proj = nn.Linear(cfg.conv_dim, cfg.embed_dim)
        self.dropout_input = nn.Dropout(cfg.dropout_input)
        self.conv_pos = ConvPositionalEmbedding(cfg.embed_dim, cfg.conv_pos, cfg.conv_pos_groups)
        self.encoder = TransformerEncoder(cfg)

    def conv_features(self, x: Tensor) -> Tensor:
        """(B, in_channels, L) -> (B, T, conv_dim) conv features BEFORE ``layer_norm``.

        Applies ``cfg.feature_grad_mult``: 0 runs the stack under ``torch.no_grad`` (frozen), any value
        other than 1 scales the gradients flowing into it.
        """
        mult = self.cfg.feature_grad_mult
        if mult > 0:
            features = self.feature_extractor(x)
            if mult != 1.0 and features.requires_grad:
                features = GradMultiply.apply(features, mult)
        else:
            with torch.no_grad():
                features = self.feature_extractor(x)
        return features

    def project(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T, conv_dim) -> (normed = layer_norm(features) (B, T, conv_dim),
        x = dropout_input(post_extract_proj(normed)) (B, T, D))."""
        normed = self.layer_norm(features)
        return normed, self.dropout_input(self.post_extract_proj(normed))

    def contextualize(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """(B, T, D) -> (B, T, D): add the conv positional embedding, then run the transformer.

        ``padding_mask`` (B, T) bool, True = padded token: those tokens are zeroed after the positional
        embedding and ignored as attention keys (fairseq behaviour). With :data:`FUSIONS` ``.pad_tokens`` the
        transformer runs on ``T`` rounded up to a multiple of ``pad_multiple`` (the positional conv on ``T``),
        and the output is cut back to ``(B, T, D)``.
        """
        return self._contextualize(x, padding_mask, need_weights=False)[0]

    def _contextualize(
        self, x: Tensor, padding_mask: Tensor | None, need_weights: bool
    ) -> tuple[Tensor, list[Tensor]]:
        x = x + self.conv_pos(x)
        if padding_mask is not None:
            x = x.masked_fill(padding_mask[..., None], 0.0)
        b, t, _ = x.shape
        pad = padded_length(t, FUSIONS.pad_multiple) - t if FUSIONS.pad_tokens and self._maskable() else 0
        if not pad:
            return self.encoder(x, padding_mask, need_weights)
        # Fusions.pad_tokens: zero tokens at the end, masked as keys. Every other op is per token, so the
        # real tokens' outputs (and gradients: nothing flows from the cut-off rows) are the unpadded ones.
        keep = padding_mask if padding_mask is not None else torch.zeros(b, t, dtype=torch.bool, device=x.device)
        out, maps = self.encoder(F.pad(x, (0, 0, 0, pad)), F.pad(keep, (0, pad), value=True), need_weights)
        return out[:, :t], [m[:, :t, :t] for m in maps]

    def _maskable(self) -> bool:
        """Whether the layers' attention takes a key-padding mask (not after ``prepare_for_inference``)."""
        return all(isinstance(layer.self_attn, SelfAttention) for layer in self.encoder.layers)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, L) -> (B, T, D)."""
        return self.contextualize(self.project(self.conv_features(x))[1])

    def embed(self, x: Tensor) -> Tensor:
        """(B, in_channels, L) -> (B, D) float32: mean over time of :meth:`forward` (ECG-FM's segment
        embedding), taken in float32 also when the tokens are bfloat16."""
        return self.forward(x).float().mean(dim=1)

    def forward_with_attention(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, in_channels, L) -> (out (B, T, D), attention (B, layers, T, T)), attention probabilities
        averaged over heads (query x key), as ECG-FM's saliency maps use them."""
        out, maps = self._contextualize(self.project(self.conv_features(x))[1], None, need_weights=True)
        return out, torch.stack(maps, dim=1)


def compile_layers(encoder: EcgEncoder, mode: str | None = None) -> None:
    """``torch.compile`` each transformer layer in place (one graph, shared by all layers of the same shape).

    Fuses the elementwise work around the matmuls (dropout, residual, LayerNorm, GELU, dtype casts), which
    dominates a bf16 step's non-matmul time on GPU. Compiling per layer, not the whole model, keeps state-dict
    keys unchanged and leaves the data-dependent masking code eager. The first step pays the compilation.
    ``mode``: ``torch.compile``'s (None = its default; the GPU benchmark tries ``"reduce-overhead"``, CUDA graphs).
    """
    for layer in encoder.encoder.layers:
        layer.compile(mode=mode)


class EcgClassifier(nn.Module):
    """ECG-FM finetuning wrapper: encoder -> dropout -> mean over time -> Linear ``proj`` -> logits.

    State keys are ``encoder.<encoder keys>`` + ``proj.weight`` / ``proj.bias``, the layout of the
    official finetuned checkpoints. fairseq pools with sum / count-of-nonzeros, identical to the plain
    mean used here unless an output is exactly 0.
    """

    def __init__(
        self,
        cfg: EncoderConfig,
        n_labels: int,
        final_dropout: float = 0.0,
        encoder: EcgEncoder | None = None,
    ):
        super().__init__()
        self.encoder = encoder if encoder is not None else EcgEncoder(cfg)
        self.final_dropout = nn.Dropout(final_dropout)
        self.proj = nn.Linear(cfg.embed_dim, n_labels)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    @property
    def n_labels(self) -> int:
        return self.proj.out_features

    def pooled(self, x: Tensor) -> Tensor:
        """(B, in_channels, L) -> (B, D) pooled embedding fed to ``proj``."""
        return self.final_dropout(self.encoder(x)).mean(dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, L) -> logits (B, n_labels)."""
        return self.proj(self.pooled(x))


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (weight-norm g and v counted separately, as in fairseq's counts)."""
    return sum(p.numel() for p in module.parameters())
