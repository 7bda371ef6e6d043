"""The fast inference path of the ECG-FM encoder, as a transformation of the one module tree.

:func:`prepare_for_inference` swaps leaves of an :class:`~ecgfm_cli.model.encoder.EcgEncoder` (or of an
:class:`~ecgfm_cli.model.encoder.EcgClassifier`'s encoder) IN PLACE for fused modules that compute the same
function from the same weights, so ``EcgEncoder.forward`` stays the one forward that runs; only how a leaf
computes changes:

* every ``nn.Linear`` (and each kernel == stride conv block, a matmul over windows) becomes a :class:`Dense`:
  weights cast once to the compute dtype, on CPU oneDNN's linear with the bias and the following GELU fused
  into the matmul, on a weight packed once into oneDNN's layout; the fused GELU replaces its module by
  ``nn.Identity``;
* ``SelfAttention`` becomes :class:`FusedSelfAttention`: one q/k/v projection with the softmax scale folded
  into q, and :func:`attention` (per sample on CPU, float32 softmax);
* the positional conv becomes :class:`FrozenPositionalEmbedding`: weight norm folded, the FFT of its kernel
  computed once per length and device.

The prepared module is for inference only (eval mode, no gradients, no padding mask or attention maps) and
its state-dict keys are no longer the checkpoint's: save and load the unprepared module. ``ecgfm embed`` and
finetune's prediction pass run it. Measurements: docs/performance.md.

Shapes: B batch, C leads, L samples per segment, T tokens (L // 16), D embed_dim (768 for base).
"""

from __future__ import annotations

import copy
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ecgfm_cli.model.encoder import (
    ConvPositionalEmbedding,
    EcgClassifier,
    EcgEncoder,
    SelfAttention,
    conv_windows,
    fft_length,
    grouped_conv_fft,
    kernel_spectrum,
    window_weight,
)

Prepared = TypeVar("Prepared", EcgEncoder, EcgClassifier)


def prepare_for_inference(module: Prepared, dtype: torch.dtype = torch.float32) -> Prepared:
    """Swap ``module``'s leaves for their fused inference forms, in place; returns ``module`` in eval mode
    with gradients off. ``dtype``: the compute dtype the matmul weights are cast to once (``torch.bfloat16``
    for a bfloat16 run under ``torch.autocast``). An ``EcgClassifier``'s ``proj`` stays a plain linear.

    The swapped-out weights are released; use :func:`inference_copy` to keep the original module.
    """
    encoder = module.encoder if isinstance(module, EcgClassifier) else module
    # normal tensors even when called under inference_mode: Dense and the spectrum cache read weight versions
    with torch.inference_mode(False), torch.no_grad():
        for i, block in enumerate(encoder.feature_extractor.conv_layers):
            conv = block[0]
            if isinstance(conv, nn.Conv1d) and conv.kernel_size[0] == conv.stride[0]:
                fuse_gelu = i > 0  # block 0 normalises between its conv and its GELU
                block[0] = WindowDense(window_weight(conv.weight).to(dtype), conv.kernel_size[0], fuse_gelu)
                if fuse_gelu:
                    block[-1] = nn.Identity()
        encoder.post_extract_proj = Dense.copy(encoder.post_extract_proj, dtype)
        encoder.conv_pos = FrozenPositionalEmbedding(encoder.conv_pos)
        for layer in encoder.encoder.layers:
            layer.self_attn = FusedSelfAttention(layer.self_attn, dtype)
            fuse_gelu = isinstance(layer.activation, nn.GELU) and layer.activation.approximate == "none"
            layer.fc1 = Dense.copy(layer.fc1, dtype, gelu=fuse_gelu)
            if fuse_gelu:
                layer.activation = nn.Identity()
            layer.fc2 = Dense.copy(layer.fc2, dtype)
    return module.eval().requires_grad_(False)


def inference_copy(module: Prepared, dtype: torch.dtype = torch.float32) -> Prepared:
    """:func:`prepare_for_inference` of a copy: ``module`` (e.g. a model still training) is left as it is."""
    return prepare_for_inference(copy.deepcopy(module), dtype)


class FusedSelfAttention(nn.Module):
    """``SelfAttention`` with one (3D x D) q/k/v :class:`Dense` (q rows pre-scaled by 1/sqrt(head dim)) and
    :func:`attention`: x (B, T, D) -> (out (B, T, D), None). Takes no padding mask and gives no weights."""

    def __init__(self, att: SelfAttention, dtype: torch.dtype):
        super().__init__()
        self.heads = att.heads
        d = att.q_proj.weight.shape[0]
        scale = (d // att.heads) ** -0.5  # the softmax scale, folded into the q rows (one pass less per layer)
        self.qkv = Dense(torch.cat([att.q_proj.weight * scale, att.k_proj.weight, att.v_proj.weight]).to(dtype),
                         torch.cat([att.q_proj.bias * scale, att.k_proj.bias, att.v_proj.bias]).to(dtype))
        self.out_proj = Dense.copy(att.out_proj, dtype)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None,
                need_weights: bool = False) -> tuple[Tensor, None]:
        if padding_mask is not None or need_weights:
            raise ValueError("an encoder prepared for inference takes no padding mask and gives no attention "
                             "weights: run the unprepared encoder (e.g. forward_with_attention) for those")
        b, t, d = x.shape
        return self.out_proj(attention(self.qkv(x).view(b, t, 3, self.heads, d // self.heads))), None


class FrozenPositionalEmbedding(nn.Module):
    """``ConvPositionalEmbedding`` with fixed weights: the weight norm folded into a plain (D, D / groups, K)
    weight and the kernel's spectrum (:func:`~ecgfm_cli.model.encoder.kernel_spectrum`) computed once per
    FFT length and device. (B, T, D) -> (B, T, D) in the input's dtype, the same function."""

    def __init__(self, pos: ConvPositionalEmbedding):
        super().__init__()
        conv = pos.pos_conv[0]
        self.groups = conv.groups
        self.weight = nn.Parameter(conv.weight.detach().float().contiguous(), requires_grad=False)
        self.bias = nn.Parameter(conv.bias.detach().float().clone(), requires_grad=False)
        self._weight_key: tuple[int, int] | None = None  # (data_ptr, version) the spectra were computed from
        self._spectrum: dict[tuple[int, str], Tensor] = {}  # (FFT length, device) -> spectrum

    def spectrum(self, frames: int, device: torch.device) -> Tensor:
        """The kernel's spectrum for ``frames`` tokens on ``device``, recomputed when the weight changes."""
        weight_key = (self.weight.data_ptr(), self.weight._version)
        if weight_key != self._weight_key:
            self._weight_key, self._spectrum = weight_key, {}
        n = fft_length(frames, self.weight.shape[-1])
        key = (n, str(device))
        if key not in self._spectrum:
            self._spectrum[key] = kernel_spectrum(self.weight.to(device), self.groups, n).contiguous()
        return self._spectrum[key]

    def forward(self, x: Tensor) -> Tensor:
        spectrum = self.spectrum(x.shape[1], x.device)
        # GELU after the cast to x's dtype: for bfloat16 one pass over half the bytes (torch's bfloat16 GELU
        # computes in float32 and rounds once; the conv's float32 output is rounded once before it)
        return F.gelu(grouped_conv_fft(x, self.weight, self.bias, self.groups, spectrum).to(x.dtype))

    def __getstate__(self) -> dict[str, Any]:  # the spectra are derived: a copy recomputes them
        return {**self.__dict__, "_weight_key": None, "_spectrum": {}}


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
    copies the broadcast bias into the output first, and GELU would be another pass over the output), on a
    copy of the weight reordered once into oneDNN's blocked layout (given a plain weight, oneDNN repacks it on
    every call). The packed copy is rebuilt when the weight changes (``.to()``, ``load_state_dict``).
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

    def extra_repr(self) -> str:
        out, inp = self.weight.shape
        return f"{inp} -> {out}, bias={self.bias is not None}, gelu={self.gelu}, dtype={self.weight.dtype}"

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


class WindowDense(Dense):
    """A bias-free kernel == stride conv block as a :class:`Dense` over the non-overlapping windows of a
    channels-last signal: (B, L, C_in) -> (B, L // kernel, C_out); ``weight`` is
    :func:`~ecgfm_cli.model.encoder.window_weight` of the conv's."""

    def __init__(self, weight: Tensor, kernel: int, gelu: bool = False):
        super().__init__(weight, None, gelu)
        self.kernel = kernel

    def extra_repr(self) -> str:
        return f"kernel=stride={self.kernel}, {super().extra_repr()}"

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(conv_windows(x, self.kernel))


def attention(qkv: Tensor) -> Tensor:
    """Softmax attention without a mask: (B, T, 3, H, d) projected q/k/v (q already scaled by 1/sqrt(d)) ->
    (B, T, H * d).

    On CPU one sample at a time, so that its (H, T, T) scores stay in cache: q/k/v are laid out head-major
    once, each sample's heads are written straight into the (B, T, H, d) output, and the softmax runs in
    float32, which torch computes faster than in bfloat16; at ECG-FM's 156 tokens this beats batching all
    samples and torch's flash kernel, which is tuned for long sequences. Elsewhere
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
