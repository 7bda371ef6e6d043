"""ECG-FM pretraining objective (W2V + CMSC + RLM) as plain torch modules and functions.

Follows fairseq-signals @ 6b9e137 (``Wav2Vec2Model``/``Wav2Vec2CMSCModel`` forward and the
``wav2vec2_with_cmsc`` criterion); see docs reference §2. Shapes: ``B`` segments, ``L`` samples, ``T`` encoder
frames (``L // 16``), ``T'`` masked frames per row (equal for all rows), ``C`` conv channels, ``D`` model width,
``F`` = ``final_dim`` (= vq_dim), ``N`` negatives.

Loss bookkeeping (as fairseq): :func:`total_loss` returns a SUM-style loss whose natural denominator is
``sample_size`` (number of masked frames in the local batch). The trainer all-reduces ``sample_size`` over
ranks (and accumulation steps) and divides the summed loss by that global count, which yields
``mean-per-masked-frame InfoNCE + 0.1 * diversity + 10 * feature_pen + 1.0 * CMSC``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ecgfm_cli.model.config import EncoderConfig, PretrainConfig
from ecgfm_cli.model.encoder import EcgEncoder
from ecgfm_cli.model.masking import compute_span_mask
from ecgfm_cli.model.quantizer import GumbelVectorQuantizer

__all__ = [
    "PretrainConfig",
    "Wav2Vec2Pretrainer",
    "all_gather_keep_local_grad",
    "cmsc_loss",
    "compute_span_mask",
    "contrastive_logits",
    "contrastive_loss",
    "pool_time",
    "sample_negative_indices",
    "total_loss",
]


# --------------------------------------------------------------------------------------------------
# negatives and contrastive logits


def sample_negative_indices(
    batch_size: int,
    num_masked: int,
    num_negatives: int = 100,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw negatives for every masked frame, with replacement, from the OTHER masked frames of the same row.

    fairseq: ``randint(0, T' - 1)`` then ``+1`` where ``>= own index``, so the frame itself is never drawn and
    the other ``T' - 1`` frames are uniform.

    Returns:
        Long ``(B, T', N)``, per-row indices into the masked frames (``0 <= idx < T'``, ``idx[b, t] != t``).
    """
    if num_masked < 2:
        raise ValueError(f"need at least 2 masked frames per row to draw negatives, got {num_masked}")
    # Without a generator, draw where the indices are used (the device's RNG, saved in run checkpoints): no
    # 100-per-frame index tensor to build on the host and copy over every step.
    where = generator.device if generator is not None else torch.device(device if device is not None else "cpu")
    idx = torch.randint(0, num_masked - 1, (batch_size, num_masked, num_negatives), generator=generator,
                        device=where)
    idx += (idx >= torch.arange(num_masked, device=where)[None, :, None]).long()
    return idx.to(device) if device is not None else idx


def _take_frames(x: Tensor, positions: Tensor) -> Tensor:
    """``x (B, T, C)``, ``positions (B, T')`` frame indices -> ``(B, T', C)``."""
    return x.gather(1, positions[..., None].expand(-1, -1, x.shape[-1]))


def contrastive_logits(pred: Tensor, y: Tensor, idx: Tensor, logit_temp: float = 0.1) -> Tensor:
    """Cosine-similarity logits of each prediction against its positive and its ``N`` negatives, ``/ logit_temp``;
    column 0 is the positive, and a negative exactly equal to the positive (same code) gets ``-inf`` (fairseq's
    ``neg_is_pos``). The values fairseq gets from materialised ``(N, B, T', F)`` negatives (tested against
    that form), without materialising them and their gradient scatter, which dominate a small model's step.

    Every prediction is compared with every masked target of its row once, ``(B, T', T')``, and the
    negatives' logits are gathered from that matrix. ``neg_is_pos`` is still exact equality of target
    vectors (a distance of exactly 0, computed without the matmul shortcut).

    Args: ``pred``, ``y`` ``(B, T', F)``; ``idx`` ``(B, T', N)`` per-row indices. Returns float32 ``(B, T', 1 + N)``.
    Computed in float32 also under autocast, as fairseq's ``cosine_similarity(x.float(), y.float())``: in bf16
    the logits (/ 0.1) are off by up to ~0.03.
    """
    t = y.float()
    with torch.autocast(pred.device.type, enabled=False):
        # torch.cosine_similarity's guard: each vector divided by max(|v|, 1e-8)
        p_unit = pred.float() / pred.float().norm(dim=-1, keepdim=True).clamp_min(1e-8)
        t_unit = t / t.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        sim = torch.bmm(p_unit, t_unit.transpose(1, 2)) / logit_temp  # (B, T', T')
    idx = idx.to(sim.device)
    pos = sim.diagonal(dim1=1, dim2=2).unsqueeze(-1)
    neg = torch.gather(sim, 2, idx)
    with torch.no_grad():
        same = torch.cdist(t, t, compute_mode="donot_use_mm_for_euclid_dist") == 0  # (B, T', T')
        neg_is_pos = torch.gather(same, 2, idx)
    return torch.cat([pos, neg.masked_fill(neg_is_pos, float("-inf"))], dim=-1)


def contrastive_loss(logits: Tensor) -> Tensor:
    """InfoNCE with target 0, SUM over frames: ``logits (..., 1 + N)`` -> scalar."""
    flat = logits.reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat, flat.new_zeros(flat.shape[0], dtype=torch.long), reduction="sum")


# --------------------------------------------------------------------------------------------------
# model


class Wav2Vec2Pretrainer(nn.Module):
    """ECG-FM pretraining model: :class:`EcgEncoder` plus the wav2vec 2.0 heads.

    Attributes: ``encoder``, ``mask_emb (D,)`` U[0, 1), ``quantizer``, ``project_q`` Linear(F, F),
    ``final_proj`` Linear(D, F), ``dropout_features``. State-dict keys are ``encoder.<fairseq encoder key>``
    plus fairseq's own head keys (see :func:`ecgfm_cli.model.checkpoint.state_dict_from_fairseq`).

    The encoder is built from ``encoder_cfg`` with ``feature_grad_mult`` replaced by ``cfg.feature_grad_mult``
    (0.1: gradients into the conv stack are scaled by 0.1).
    """

    def __init__(self, encoder_cfg: EncoderConfig, cfg: PretrainConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg if cfg is not None else PretrainConfig()
        self.encoder_cfg = dataclasses.replace(encoder_cfg, feature_grad_mult=cfg.feature_grad_mult)
        conv_dim = self.encoder_cfg.conv_layers[-1][0]
        embed_dim = self.encoder_cfg.embed_dim
        self.encoder = EcgEncoder(self.encoder_cfg)
        self.mask_emb = nn.Parameter(torch.empty(embed_dim).uniform_())
        self.quantizer = GumbelVectorQuantizer(
            conv_dim,
            num_vars=cfg.latent_vars,
            groups=cfg.latent_groups,
            vq_dim=cfg.final_dim,
            temp=(cfg.latent_temp_max, cfg.latent_temp_min, cfg.latent_temp_decay),
            schedule=cfg.latent_temp_schedule,
        )
        self.project_q = nn.Linear(cfg.final_dim, cfg.final_dim)
        self.final_proj = nn.Linear(embed_dim, cfg.final_dim)
        self.dropout_features = nn.Dropout(cfg.dropout_features)

    def set_num_updates(self, num_updates: int, progress: float | None = None) -> None:
        """Set the optimizer-step counter (and, for a ``"run"`` temperature schedule, the run's progress in
        [0, 1]) that drive the Gumbel temperature."""
        self.quantizer.set_num_updates(num_updates, progress)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        negatives_idx: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """One masked forward pass.

        Args:
            x: ``(B, in_channels, L)`` z-scored ECG segments (RLM already applied by the data side).
            mask: optional precomputed ``(B, T)`` bool time mask (equal count per row, >= 2); drawn with
                :func:`compute_span_mask` otherwise. Ignored when ``cfg.w2v`` is False (no masking then).
            negatives_idx: optional ``(B, T', N)`` per-row negative indices (see :func:`sample_negative_indices`).
            generator: CPU generator for the mask, the negatives and the Gumbel noise (global RNG if None).

        Returns:
            dict with ``x_out (B, T, D)`` transformer output of the masked pass (CMSC input), ``features_pen``
            (mean squared conv features, before LayerNorm), and for W2V: ``logits (B, T', 1+N)``,
            ``contrastive_loss`` (sum over masked frames), ``num_masked`` (long, ``B * T'``),
            ``prob_perplexity``, ``code_perplexity``, ``temperature``, ``diversity_loss`` ((GV - ppl) / GV),
            ``mask (B, T)`` and ``negatives_idx``. With ``cfg.w2v`` False the W2V entries are zeros/None.
        """
        cfg = self.cfg
        features = self.encoder.conv_features(x)  # (B, T, C), grads scaled by feature_grad_mult
        features_pen = features.float().pow(2).mean()
        normed, h = self.encoder.project(features)
        bsz, tsz, _ = normed.shape

        if not cfg.w2v:
            x_out = self.encoder.contextualize(h)
            zero = features_pen.new_zeros(())
            return {
                "x_out": x_out,
                "features_pen": features_pen,
                "logits": None,
                "contrastive_loss": zero,
                "num_masked": torch.zeros((), dtype=torch.long, device=x.device),
                "prob_perplexity": zero,
                "code_perplexity": zero,
                "temperature": torch.full((), self.quantizer.temperature, device=x.device),
                "diversity_loss": zero,
                "mask": None,
                "negatives_idx": None,
            }

        if mask is None:  # drawn on CPU, so checking it and locating its frames never waits for the GPU
            mask = compute_span_mask((bsz, tsz), cfg.mask_prob, cfg.mask_length, cfg.min_masks, generator=generator)
        counts = mask.sum(dim=1)
        if mask.shape != (bsz, tsz) or bool((counts != counts[0]).any()) or int(counts[0]) < 2:
            raise ValueError(f"mask must be (B, T)=({bsz}, {tsz}) with an equal count >= 2 of True per row")
        n_per_row = int(counts[0])
        # (B, T') indices of each row's masked frames, ascending: a gather with them selects what x[mask] does
        # without x[mask]'s device-to-host sync.
        positions = mask.nonzero()[:, 1].view(bsz, n_per_row).to(x.device, non_blocking=True)
        mask = mask.to(device=x.device, dtype=torch.bool, non_blocking=True)

        h = torch.where(mask.unsqueeze(-1), self.mask_emb.to(h.dtype), h)
        x_out = self.encoder.contextualize(h)

        y = _take_frames(self.dropout_features(normed), positions)
        q, qstats = self.quantizer(y, generator=generator)
        y = self.project_q(q)
        if negatives_idx is None:
            negatives_idx = sample_negative_indices(
                bsz, n_per_row, cfg.num_negatives, generator=generator, device=x.device
            )
        pred = self.final_proj(_take_frames(x_out, positions))
        logits = contrastive_logits(pred, y, negatives_idx, cfg.logit_temp)
        gv = self.quantizer.total_vars
        return {
            "x_out": x_out,
            "features_pen": features_pen,
            "logits": logits,
            "contrastive_loss": contrastive_loss(logits),
            "num_masked": mask.sum(),
            "prob_perplexity": qstats["prob_perplexity"],
            "code_perplexity": qstats["code_perplexity"],
            "temperature": qstats["temperature"],
            "diversity_loss": (gv - qstats["prob_perplexity"]) / gv,
            "mask": mask,
            "negatives_idx": negatives_idx,
        }


# --------------------------------------------------------------------------------------------------
# CMSC


def all_gather_keep_local_grad(t: Tensor) -> Tensor:
    """Concatenate ``t`` from all ranks along dim 0, rank order; only the local slice carries gradient.

    Requires the same shape on every rank. Identity when torch.distributed is not initialised or world size 1.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.detach().contiguous())
    parts[dist.get_rank()] = t
    return torch.cat(parts, dim=0)


def pool_time(x_out: Tensor) -> Tensor:
    """Reference mean pooling ``sum_t x / count_nonzero_t x`` per channel: ``(B, T, D)`` -> ``(B, D)``.

    The count is clamped at 1 so an all-zero channel gives 0 instead of NaN.
    """
    return x_out.sum(dim=1) / (x_out != 0).sum(dim=1).clamp(min=1)


def cmsc_loss(
    x_out: Tensor,
    record_ids: Tensor,
    temp: float = 0.1,
    first: Tensor | None = None,
    second: Tensor | None = None,
    gather: bool = False,
    eps: float = 1e-8,
) -> Tensor:
    """Contrastive multi-segment coding loss (symmetric InfoNCE over adjacent-segment pairs).

    Args:
        x_out: ``(B, T, D)`` transformer output of the masked pass.
        record_ids: ``(B,)`` long record id of every row; equal ids are positives (so two pairs of the same
            record in a batch are both positives, as the reference's ``idx_i == idx_j`` target matrix).
        temp: softmax temperature (0.1).
        first, second: ``(P,)`` row indices of the first/second segment of each pair; default rows ``0::2`` and
            ``1::2``.
        gather: all-gather the pooled embeddings and ids across ranks (more negatives; gradient flows only
            through the local rows). The reference criterion uses the local batch only. Every rank must hold
            the same number of pairs.
        eps: floor of the L2 norm.

    Returns:
        Scalar ``0.5 * mean(-log_softmax(S)[pos]) + 0.5 * mean(-log_softmax(S^T)[pos^T])`` with
        ``S = Z_first @ Z_second^T / temp``. As in the reference, the L2 norm is treated as a constant
        (``z / max(||z||.detach(), eps)``).
    """
    z = pool_time(x_out.float())
    z = z / z.detach().norm(dim=-1, keepdim=True).clamp(min=eps)
    record_ids = record_ids.to(z.device)
    first = torch.arange(0, z.shape[0] - 1, 2, device=z.device) if first is None else first.to(z.device)
    second = first + 1 if second is None else second.to(z.device)
    if first.numel() == 0:
        raise ValueError(f"CMSC needs at least one pair of segments; the batch has {z.shape[0]} row(s)")
    z0, z1 = z[first], z[second]
    id0, id1 = record_ids[first], record_ids[second]
    if gather:
        z0, z1 = all_gather_keep_local_grad(z0), all_gather_keep_local_grad(z1)
        id0, id1 = all_gather_keep_local_grad(id0), all_gather_keep_local_grad(id1)
    with torch.autocast(z.device.type, enabled=False):  # float32 also under autocast (bf16 moved the loss ~1 %)
        sim = z0 @ z1.T / temp
    pos = (id0[:, None] == id1[None, :]).to(sim.dtype)  # a weighted mean, not lsm[pos]: no device sync
    n_pos = pos.sum()
    loss_rows = -(sim.log_softmax(dim=1) * pos).sum() / n_pos
    loss_cols = -(sim.T.log_softmax(dim=1) * pos.T).sum() / n_pos
    return 0.5 * loss_rows + 0.5 * loss_cols


# --------------------------------------------------------------------------------------------------
# combination


def total_loss(out: dict[str, Tensor], cmsc: Tensor | None, cfg: PretrainConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """Reference combination of the terms (fairseq ``wav2vec2_with_cmsc`` criterion).

    ``loss = contrastive_sum + S * (0.1 * diversity + 10 * features_pen) + S * cmsc_weight * cmsc`` with
    ``S = sample_size = num_masked`` (local masked-frame count). The trainer must divide by the GLOBAL sample
    size (all-reduced over ranks and accumulation steps), not by the local one.

    Ablations: with ``cfg.w2v`` False there are no contrastive/diversity/penalty terms and
    ``sample_size = B`` (segments in the local batch), so ``loss / sample_size = cmsc_weight * cmsc``; with
    ``cfg.cmsc`` False the CMSC term is dropped (``cmsc`` may be None).

    Returns:
        ``(loss, logs)``; ``logs`` are detached 0-d tensors (no host sync): ``sample_size``, ``contrastive``,
        ``diversity``, ``features_pen``, ``cmsc``, ``prob_perplexity``, ``code_perplexity``, ``temperature``,
        ``correct``, ``count`` (InfoNCE accuracy = correct / count, fairseq's definition).
    """
    if not (cfg.w2v or cfg.cmsc):
        raise ValueError("at least one of w2v and cmsc must be enabled")
    device = out["x_out"].device
    zero = torch.zeros((), device=device)
    if cfg.w2v:
        sample_size = out["num_masked"].to(torch.float32)
        loss = out["contrastive_loss"] + sample_size * (
            cfg.diversity_weight * out["diversity_loss"] + cfg.features_pen_weight * out["features_pen"]
        )
    else:
        sample_size = torch.full((), float(out["x_out"].shape[0]), device=device)
        loss = zero
    if cfg.cmsc:
        if cmsc is None:
            raise ValueError("cfg.cmsc is on but no CMSC loss was given")
        loss = loss + sample_size * cfg.cmsc_weight * cmsc

    logs = {
        "sample_size": sample_size.detach(),
        "contrastive": out["contrastive_loss"].detach(),
        "diversity": out["diversity_loss"].detach(),
        "features_pen": out["features_pen"].detach(),
        "cmsc": cmsc.detach() if (cfg.cmsc and cmsc is not None) else zero,
        "prob_perplexity": out["prob_perplexity"].detach(),
        "code_perplexity": out["code_perplexity"].detach(),
        "temperature": out["temperature"].detach(),
    }
    logits = out.get("logits")
    if cfg.w2v and logits is not None and logits.numel():
        with torch.no_grad():
            flat = logits.reshape(-1, logits.shape[-1])
            is_max, is_min = flat.argmax(-1) == 0, flat.argmin(-1) == 0
            logs["correct"] = (is_max & ~is_min).sum().float()
            logs["count"] = torch.full((), float(flat.shape[0]), device=device)
    else:
        logs["correct"] = zero
        logs["count"] = zero
    return loss, logs
