"""The fast inference path of the ECG-FM encoder: :class:`InferenceEncoder`, an inference-only
re-arrangement of an :class:`~ecgfm_cli.model.encoder.EcgEncoder`'s weights that computes the same function
as ``EcgEncoder.embed``, faster on CPU (and on GPU in bfloat16).

What it changes, not what it computes: a fused q/k/v projection, kernel == stride convolutions as matmuls in
channels-last layout, the positional conv by FFT with its kernel spectrum computed once, weights pre-cast for
bfloat16 and pre-packed for oneDNN (:class:`Dense`), and a per-sample CPU attention with a float32 softmax
(:func:`attention`). ``ecgfm embed`` runs it; the training encoder stays the one with fairseq's keys.

Shapes: B batch, C leads, L samples per segment, T tokens (L // 16), D embed_dim (768 for base).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ecgfm_cli.model.encoder import (
    EcgEncoder,
    channel_norm,
    conv_windows,
    fft_length,
    grouped_conv_fft,
    kernel_spectrum,
    window_weight,
)


class InferenceEncoder(nn.Module):
    """Inference-only twin of :class:`EcgEncoder`: (B, C, L) float -> (B, D) float32 mean-pooled embedding.

    Built from a trained encoder's weights (copied, the source module is untouched). Differences from
    ``EcgEncoder.forward`` are arrangement only, not function:

    * conv blocks whose kernel equals their stride (all of ECG-FM's) are one matmul on non-overlapping
      windows in channels-last (B, T, C) layout, so no transposes between blocks and no im2col;
    * the block-0 GroupNorm (one group per channel = normalise each channel over time) is computed in
      float32, as fairseq does; every other op runs in the compute dtype;
    * q, k and v are one (3D x D) projection; the pos-conv weight norm is folded into a plain weight and
      the conv is computed by FFT in float32 (:meth:`positional`);
    * with ``dtype=torch.bfloat16`` matmul/conv weights are stored in bfloat16 once, so ``torch.autocast``
      does not re-cast 90 M parameters on every batch; on CPU the FFN's GELU runs inside fc1's matmul.

    Dropout and masking do not exist here: the output is deterministic.
    """

    def __init__(self, encoder: EcgEncoder, dtype: torch.dtype = torch.float32):
        super().__init__()
        cfg = encoder.cfg
        self.cfg = cfg
        self.compute_dtype = dtype
        wdt = dtype  # dtype of matmul / conv weights
        with torch.no_grad():
            self.conv_specs: list[tuple[int, int]] = []
            self.convs = nn.ModuleList()
            for i, (_, kernel, stride) in enumerate(cfg.conv_layers):
                w = encoder.feature_extractor.conv_layers[i][0].weight.detach()  # (out, in, k)
                self.conv_specs.append((kernel, stride))
                if kernel == stride:
                    w = window_weight(w)
                self.convs.append(Dense(w.to(wdt), None, gelu=i > 0))  # block 0 normalises before its GELU
            gn = encoder.feature_extractor.conv_layers[0][2]
            self.gn_weight = nn.Parameter(gn.weight.detach().float().clone(), requires_grad=False)
            self.gn_bias = nn.Parameter(gn.bias.detach().float().clone(), requires_grad=False)
            self.gn_eps = gn.eps
            self.layer_norm = _frozen_copy(encoder.layer_norm)
            self.post_extract_proj = Dense.copy(encoder.post_extract_proj, wdt)
            pos = encoder.conv_pos.pos_conv[0]
            self.pos_groups = cfg.conv_pos_groups
            self.pos_bias = nn.Parameter(pos.bias.detach().float().clone(), requires_grad=False)
            self.pos_weight = nn.Parameter(pos.weight.detach().float().contiguous(), requires_grad=False)
            self._pos_spectrum: dict[tuple[int, str], Tensor] = {}
            self.input_norm = _frozen_copy(encoder.encoder.layer_norm)
            self.layers = nn.ModuleList(_FusedLayer(layer, cfg.heads, wdt) for layer in encoder.encoder.layers)

    def features(self, x: Tensor) -> Tensor:
        """(B, C, L) -> (B, T, conv_dim) conv features, channels-last."""
        h = x.transpose(1, 2)  # (B, L, C)
        for i, ((kernel, stride), conv) in enumerate(zip(self.conv_specs, self.convs, strict=True)):
            if kernel == stride:
                h = conv(conv_windows(h, kernel))
            else:  # general conv (not in ECG-FM): back to channels-first for conv1d
                w = conv.weight
                h = F.conv1d(h.transpose(1, 2).to(w.dtype), w, stride=stride).transpose(1, 2)
                h = F.gelu(h) if conv.gelu else h
            if i == 0:
                h = F.gelu(channel_norm(h, self.gn_weight, self.gn_bias, self.gn_eps))
        return h

    def tokens(self, x: Tensor) -> Tensor:
        """(B, C, L) -> (B, T, D) contextual token embeddings (``EcgEncoder.forward``)."""
        h = self.post_extract_proj(self.layer_norm(self.features(x)))
        h = h + F.gelu(self.positional(h).to(h.dtype))
        h = self.input_norm(h)
        for layer in self.layers:
            h = layer(h)
        return h

    def positional(self, h: Tensor) -> Tensor:
        """(B, T, D) -> (B, T, D) float32: the grouped positional conv (before its GELU), via FFT
        (:func:`~ecgfm_cli.model.encoder.grouped_conv_fft`)."""
        n = fft_length(h.shape[1], self.pos_weight.shape[-1])
        key = (n, str(h.device))
        if key not in self._pos_spectrum:  # the weights are fixed: transform them once per length and device
            self._pos_spectrum[key] = kernel_spectrum(self.pos_weight.to(h.device), self.pos_groups, n).contiguous()
        return grouped_conv_fft(h, self.pos_weight, self.pos_bias, self.pos_groups, self._pos_spectrum[key])

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, L) -> (B, D) float32 mean over tokens."""
        return self.tokens(x).float().mean(dim=1)


class _FusedLayer(nn.Module):
    """A post-LN transformer layer with a fused q/k/v projection (inference only)."""

    def __init__(self, layer: nn.Module, heads: int, wdt: torch.dtype):
        super().__init__()
        att = layer.self_attn
        self.heads = heads
        d = att.q_proj.weight.shape[0]
        scale = (d // heads) ** -0.5  # the softmax scale, folded into the q rows (one pass less per layer)
        self.qkv = Dense(torch.cat([att.q_proj.weight * scale, att.k_proj.weight, att.v_proj.weight]).to(wdt),
                         torch.cat([att.q_proj.bias * scale, att.k_proj.bias, att.v_proj.bias]).to(wdt))
        self.out_proj = Dense.copy(att.out_proj, wdt)
        self.ln1 = _frozen_copy(layer.self_attn_layer_norm)
        self.fc1 = Dense.copy(layer.fc1, wdt, gelu=True)
        self.fc2 = Dense.copy(layer.fc2, wdt)
        self.ln2 = _frozen_copy(layer.final_layer_norm)
        self.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        a = attention(self.qkv(x).view(b, t, 3, self.heads, d // self.heads))
        # residual adds in place into the fresh projection outputs: one (B, T, D) allocation less each
        x = self.ln1(self.out_proj(a).add_(x))
        return self.ln2(self.fc2(self.fc1(x)).add_(x))


def _onednn_linear_works() -> bool:
    """Whether oneDNN's fused linear(+GELU) op exists and runs in this torch build (x86/ARM CPU builds)."""
    try:
        x = torch.ones(2, 4)
        for dt in (torch.float32, torch.bfloat16):
            y = torch.ops.mkldnn._linear_pointwise(x.to(dt), x.to(dt), None, "gelu", [], "none")
            if y.shape != (2, 2):
                return False
        return bool(torch.backends.mkldnn.is_available())
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


_ONEDNN: bool | None = None
#: Row count oneDNN's weight layout is chosen for (16 segments x 156 frames); other counts run on it too.
PACK_ROWS = 2496


class Dense(nn.Module):
    """``x @ weight.T + bias``, then exact GELU if ``gelu``: (..., in) -> (..., out) in the weight's dtype.

    On CPU this is oneDNN's linear with the bias and GELU fused into the matmul's epilogue (ATen's ``addmm``
    copies the broadcast bias into the output before the GEMM and GELU is another pass over (B, T, 3072),
    together ~25 % of a bfloat16 forward on two cores), on a copy of the weight reordered once into
    oneDNN's blocked layout: given a plain weight, oneDNN repacks it on every call, 4-12 % of each matmul
    at ECG-FM's shapes. The packed copy is rebuilt when the weight changes (``.to()``, ``load_state_dict``).
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, gelu: bool = False):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone().contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.gelu = gelu
        self._packed: tuple[tuple[int, int], Tensor] | None = None  # ((data_ptr, version), packed weight)

    @classmethod
    def copy(cls, src: nn.Linear, dtype: torch.dtype, gelu: bool = False) -> Dense:
        return cls(src.weight.to(dtype), None if src.bias is None else src.bias.to(dtype), gelu)

    def packed_weight(self) -> Tensor:
        """The weight in oneDNN's blocked layout (the plain weight where this torch build cannot pack it)."""
        w = self.weight
        key = (w.data_ptr(), w._version)
        if self._packed is None or self._packed[0] != key:
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), PACK_ROWS)
            except (AttributeError, RuntimeError, NotImplementedError):
                packed = w.detach()
            self._packed = (key, packed)
        return self._packed[1]

    def forward(self, x: Tensor) -> Tensor:
        global _ONEDNN
        w = self.weight
        x = x.to(w.dtype)
        if x.device.type == "cpu":
            if _ONEDNN is None:
                _ONEDNN = _onednn_linear_works()
            if _ONEDNN:
                y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self.packed_weight(), self.bias,
                                                       "gelu" if self.gelu else "none", [],
                                                       "none" if self.gelu else "")
                return y.view(*x.shape[:-1], w.shape[0])
        y = F.linear(x, w, self.bias)
        return F.gelu(y) if self.gelu else y

    def __getstate__(self) -> dict[str, Any]:  # oneDNN's opaque packed tensor cannot be copied or pickled
        return {**self.__dict__, "_packed": None}


def attention(qkv: Tensor) -> Tensor:
    """Softmax attention without a mask: (B, T, 3, H, d) projected q/k/v (q already scaled by 1/sqrt(d)) ->
    (B, T, H * d).

    On CPU one sample at a time, so that its (H, T, T) scores stay in cache: q/k/v are laid out head-major
    once, each sample's heads are written straight into the (B, T, H, d) output, and the softmax runs in
    float32, which torch computes twice as fast as in bfloat16. At ECG-FM's 156 tokens this is ~25 % faster
    than batching all samples and beats torch's flash kernel, which is tuned for long sequences. Elsewhere
    ``scaled_dot_product_attention``.
    """
    b, t, _, h, dh = qkv.shape
    if qkv.device.type != "cpu":
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, d) views
        return F.scaled_dot_product_attention(q, k, v, scale=1.0).transpose(1, 2).reshape(b, t, h * dh)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).contiguous().unbind(0)  # (B, H, T, d) each
    out = torch.empty(b, t, h, dh, dtype=qkv.dtype)
    for i in range(b):
        scores = torch.bmm(q[i], k[i].transpose(1, 2)).float()  # (H, T, T)
        probs = torch.softmax(scores, dim=-1, out=scores).to(v.dtype)
        torch.bmm(probs, v[i], out=out[i].transpose(0, 1))
    return out.view(b, t, h * dh)


def _frozen_copy(src: nn.LayerNorm) -> nn.LayerNorm:
    out = nn.LayerNorm(src.normalized_shape, eps=src.eps)
    out.load_state_dict(src.state_dict())
    return out.requires_grad_(False)
