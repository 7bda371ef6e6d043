"""wav2vec 2.0 time-span masks for ECG-FM pretraining: a pure function of a shape and a ``torch.Generator``, so
a run is reproducible and a test (or a DDP-equivalence check) can fix the masks. Random lead masking happens
on the data side (:func:`ecgfm_cli.train.data.lead_keep`), where the batches are built."""

from __future__ import annotations

import torch
from torch import Tensor


def compute_span_mask(
    shape: tuple[int, int],
    mask_prob: float = 0.65,
    mask_length: int = 10,
    min_masks: int = 2,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Time-span mask with fairseq ``compute_mask_indices`` semantics (static lengths, overlap allowed, no padding).

    One span count for the whole batch, ``num = max(min_masks, int(mask_prob * T / mask_length + U[0, 1)))``;
    per row, ``num`` distinct span starts drawn uniformly from ``[0, T - mask_length)``; spans of
    ``mask_length`` frames are unioned; finally every row is sub-sampled uniformly (without replacement) down to
    the batch-minimum count, so all rows mask exactly the same number of frames (the loss gathers masked frames
    into a dense ``(B, T', C)`` tensor).

    Args:
        shape: ``(B, T)``, batch size and number of encoder frames.
        mask_prob: expected fraction of frames that start a span, times ``mask_length``.
        mask_length: span length in frames.
        min_masks: lower bound on the number of spans per row.
        generator: CPU ``torch.Generator`` for reproducibility (global RNG if None).
        device: device of the returned tensor (the mask is drawn on CPU).

    Returns:
        Bool tensor ``(B, T)``; True = frame is masked. All False when ``mask_prob <= 0``.
    """
    bsz, tsz = shape
    if mask_prob <= 0 or tsz == 0 or bsz == 0:
        return torch.zeros(bsz, tsz, dtype=torch.bool, device=device)
    u = torch.rand((), generator=generator).item()
    num = max(min_masks, int(mask_prob * tsz / float(mask_length) + u))
    span = mask_length
    # fairseq shrinks the start range when the spans would not fit; we additionally cap num at the range size.
    if tsz - span <= num:
        span = tsz - num - 1
    n_starts = max(tsz - span, 1)
    num = min(num, n_starts)

    # `num` distinct starts per row: the first `num` entries of a random permutation of [0, n_starts).
    starts = torch.rand(bsz, n_starts, generator=generator).argsort(dim=1)[:, :num]
    idx = (starts[:, :, None] + torch.arange(mask_length)).reshape(bsz, -1)
    mask = torch.zeros(bsz, tsz + mask_length, dtype=torch.bool)
    mask.scatter_(1, idx, True)
    mask = mask[:, :tsz]

    # Equalise: keep a uniform random subset of each row's masked frames of the batch-minimum size.
    keep = int(mask.sum(1).min())
    keys = torch.rand(bsz, tsz, generator=generator).masked_fill(~mask, 2.0)
    chosen = keys.argsort(dim=1)[:, :keep]
    out = torch.zeros(bsz, tsz, dtype=torch.bool)
    out.scatter_(1, chosen, True)
    return out.to(device) if device is not None else out
