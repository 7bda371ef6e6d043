"""wav2vec 2.0 time-span masks for ECG-FM pretraining: a pure function of a shape and a ``torch.Generator``, so
a run is reproducible and a test (or a DDP-equivalence check) can fix the masks. Random lead masking happens
on the data side (:func:`ecgfm_cli.train.data.lead_keep`), where the batches are built.

:func:`draw_span_masks`, :func:`draw_negatives` and :func:`draw_targets` draw the same masks and negative
indices (same rules, same distribution; tests/test_fusions.py) from a numpy ``Generator`` for a whole batch, so
the loader's threads can make them beside the batch and the training step (on a GPU) never waits for them.
This module imports torch only inside :func:`compute_span_mask`, so the loader (``train.data``) can use it
without paying torch's start-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
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
    import torch

    bsz, tsz = shape
    if mask_prob <= 0 or tsz == 0 or bsz == 0:
        return torch.zeros(bsz, tsz, dtype=torch.bool, device=device)
    num, n_starts = _span_count(torch.rand((), generator=generator).item(), tsz, mask_prob, mask_length, min_masks)

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


def _span_count(u: float, frames: int, mask_prob: float, mask_length: int, min_masks: int) -> tuple[int, int]:
    """(spans per row, number of possible starts) of a batch, from one uniform draw ``u`` in [0, 1)."""
    num = max(min_masks, int(mask_prob * frames / float(mask_length) + u))
    span = mask_length
    # fairseq shrinks the start range when the spans would not fit; we additionally cap num at the range size.
    if frames - span <= num:
        span = frames - num - 1
    n_starts = max(frames - span, 1)
    return min(num, n_starts), n_starts


def fewest_masked(frames: int, mask_prob: float = 0.65, mask_length: int = 10, min_masks: int = 2) -> int:
    """The fewest frames of ``frames`` that a row of any batch gets masked: the span count at its smallest
    draw (U = 0), and distinct span starts cover at least ``mask_length + spans - 1`` frames (0 without masking)."""
    if mask_prob <= 0 or frames <= 0:
        return 0
    spans, _ = _span_count(0.0, frames, mask_prob, mask_length, min_masks)
    return min(frames, mask_length + spans - 1) if spans > 0 else 0


def _random_subset(rng: np.random.Generator, keys_shape: tuple[int, int], k: int,
                   allowed: np.ndarray | None = None) -> np.ndarray:
    """Per row, ``k`` distinct column indices drawn uniformly (among the ``allowed`` ones): the ``k`` smallest
    of i.i.d. U[0, 1) keys, disallowed columns keyed 2. ``(B, k)`` int64, in no particular order."""
    keys = rng.random(keys_shape)
    if allowed is not None:
        keys[~allowed] = 2.0
    return np.argpartition(keys, k - 1, axis=1)[:, :k]


def draw_span_masks(rng: np.random.Generator, batch: int, frames: int, mask_prob: float = 0.65,
                    mask_length: int = 10, min_masks: int = 2) -> np.ndarray:
    """:func:`compute_span_mask` for a ``(batch, frames)`` batch from a numpy generator: bool ``(B, T)``.

    The same rules: one span count per batch, ``max(min_masks, int(mask_prob * T / mask_length + U))``
    (fewer possible starts when the spans would not fit, the count capped at their number); per row that many
    distinct starts, uniform over the possible ones; spans of ``mask_length`` frames unioned (cut at ``T``);
    then every row sub-sampled uniformly to the batch's smallest count, so all rows mask equally many frames.
    All False when ``mask_prob <= 0``.
    """
    mask = np.zeros((batch, frames), dtype=bool)
    if mask_prob <= 0 or frames == 0 or batch == 0:
        return mask
    num, n_starts = _span_count(rng.random(), frames, mask_prob, mask_length, min_masks)
    if num <= 0:
        return mask
    starts = _random_subset(rng, (batch, n_starts), num)  # (B, num)
    idx = (starts[:, :, None] + np.arange(mask_length)).reshape(batch, -1)
    wide = np.zeros((batch, frames + mask_length), dtype=bool)
    np.put_along_axis(wide, idx, True, axis=1)
    spans = wide[:, :frames]
    keep = int(spans.sum(axis=1).min())
    if keep == 0:
        return mask
    np.put_along_axis(mask, _random_subset(rng, (batch, frames), keep, allowed=spans), True, axis=1)
    return mask


def draw_negatives(rng: np.random.Generator, batch: int, num_masked: int, num_negatives: int = 100) -> np.ndarray:
    """:func:`~ecgfm_cli.model.pretraining.sample_negative_indices` from a numpy generator: int64
    ``(B, T', N)`` per-row indices into the masked frames, uniform over the row's OTHER ``T' - 1`` masked frames
    (with replacement; ``idx[b, t, :] != t``)."""
    if num_masked < 2:
        raise ValueError(f"need at least 2 masked frames per row to draw negatives, got {num_masked}")
    idx = rng.integers(0, num_masked - 1, size=(batch, num_masked, num_negatives), dtype=np.int64)
    idx += idx >= np.arange(num_masked)[None, :, None]
    return idx


@dataclass(frozen=True)
class TargetConfig:
    """What :func:`draw_targets` needs: ``frames`` per segment (``EncoderConfig.num_frames(window)``) and the
    objective's masking and negatives (``PretrainConfig``'s fields of the same names)."""

    frames: int
    mask_prob: float = 0.65
    mask_length: int = 10
    min_masks: int = 2
    num_negatives: int = 100

    @classmethod
    def of(cls, pcfg: Any, frames: int) -> TargetConfig:
        """The targets of objective ``pcfg`` (a ``PretrainConfig``; not imported, so that this module stays
        free of torch) for segments of ``frames`` encoder frames."""
        return cls(frames=frames, mask_prob=pcfg.mask_prob, mask_length=pcfg.mask_length, min_masks=pcfg.min_masks,
                   num_negatives=pcfg.num_negatives)


def draw_targets(rng: np.random.Generator, batch: int, cfg: TargetConfig) -> dict[str, np.ndarray]:
    """The time mask and the negatives of one batch, as the forward takes them (``mask=``, ``negatives_idx=``):
    ``{"mask": bool (B, T), "negatives_idx": int64 (B, T', N)}``. Raises ``ValueError`` when a row would mask
    fewer than 2 frames (no negatives to draw; the trainer's frame check rules that out beforehand)."""
    mask = draw_span_masks(rng, batch, cfg.frames, cfg.mask_prob, cfg.mask_length, cfg.min_masks)
    n_masked = int(mask[0].sum()) if batch else 0
    return {"mask": mask, "negatives_idx": draw_negatives(rng, batch, n_masked, cfg.num_negatives)}
