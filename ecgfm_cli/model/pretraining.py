"""ECG-FM pretraining objective (W2V + CMSC + RLM) as plain torch modules and functions.

Follows fairseq-signals @ 6b9e137 (``Wav2Vec2Model``/``Wav2Vec2CMSCModel`` forward and the
``wav2vec2_with_cmsc`` criterion); see docs reference §2. Shapes: ``B`` segments, ``L`` samples, ``T`` encoder
frames (``L // 16``), ``T'`` masked frames per row (equal for all rows), ``C`` conv channels, ``D`` model width,
``F`` = ``final_dim`` (= vq_dim), ``N`` negatives.

Loss bookkeeping (as fairseq): :meth:`Wav2Vec2Pretrainer.forward` returns a SUM-style loss whose natural
denominator is ``sample_size`` (number of masked frames in the local batch), and its statistics
(:class:`PretrainStats`). The trainer all-reduces ``sample_size`` over ranks (and accumulation steps) and
divides the summed loss by that global count (:func:`ecgfm_cli.train.loop.train_step`), which yields
``mean-per-masked-frame InfoNCE + 0.1 * diversity + 10 * feature_pen + 1.0 * CMSC``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ecgfm_cli.model.config import EncoderConfig, PretrainConfig
from ecgfm_cli.model.encoder import FUSIONS, EcgEncoder
from ecgfm_cli.model.masking import compute_span_mask
from ecgfm_cli.model.quantizer import GumbelVectorQuantizer
from ecgfm_cli.model.stats import BATCH, Stats, per, weight

__all__ = [
    "PretrainConfig",
    "PretrainOutput",
    "PretrainStats",
    "Wav2Vec2Pretrainer",
    "all_gather_keep_local_grad",
    "cmsc_loss",
    "compute_span_mask",
    "contrastive_logits",
    "contrastive_loss",
    "pool_time",
    "sample_negative_indices",
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


@dataclass
class PretrainStats(Stats):
    """One micro-batch's statistics, the model's log columns of ``ecgfm pretrain`` (``log.jsonl``): 0-d
    detached float32 tensors. Each is a sum over the micro-batch; summed over micro-batches and ranks, each is
    logged divided by what its :func:`~ecgfm_cli.model.stats.per` declares."""

    loss: Tensor = per("sample_size")  #: the objective (see :meth:`Wav2Vec2Pretrainer.forward`)
    contrastive: Tensor = per("sample_size")  #: InfoNCE, summed over the masked frames
    diversity: Tensor = per(BATCH)  #: (GV - perplexity) / GV of the batch's code distribution
    features_pen: Tensor = per(BATCH)  #: mean squared conv features
    cmsc: Tensor = per(BATCH)  #: the batch's CMSC loss
    accuracy: Tensor = per("count")  #: masked frames whose positive wins (fairseq's ``correct``)
    prob_perplexity: Tensor = per(BATCH)
    code_perplexity: Tensor = per(BATCH)
    sample_size: Tensor = weight()  #: masked frames (W2V), else segments: the loss's denominator
    count: Tensor = weight()  #: InfoNCE rows (the masked frames; 0 without W2V): the accuracy's denominator


@dataclass
class PretrainOutput:
    """A forward pass: ``loss`` 0-d, a SUM whose denominator is ``stats.sample_size`` (the trainer divides by
    the GLOBAL count, see the module docstring); ``stats``; and, to inspect, ``x_out (B, T, D)`` the
    transformer output of the masked pass (CMSC's input), ``logits (B, T', 1+N)``, ``mask (B, T)`` and
    ``negatives_idx (B, T', N)`` (these three None without W2V)."""

    loss: Tensor
    stats: PretrainStats
    x_out: Tensor
    logits: Tensor | None
    mask: Tensor | None
    negatives_idx: Tensor | None


class Wav2Vec2Pretrainer(nn.Module):
    """ECG-FM pretraining model: :class:`EcgEncoder` plus the wav2vec 2.0 heads; its forward returns the
    pretraining loss (fairseq-signals' ``wav2vec2_with_cmsc`` criterion) and its statistics.

    Attributes: ``encoder``, ``mask_emb (D,)`` U[0, 1), ``quantizer``, ``project_q`` Linear(F, F),
    ``final_proj`` Linear(D, F), ``dropout_features``. State-dict keys are ``encoder.<fairseq encoder key>``
    plus fairseq's own head keys (see :func:`ecgfm_cli.model.checkpoint.state_dict_from_fairseq`).

    The encoder is built from ``encoder_cfg`` with ``feature_grad_mult`` replaced by ``cfg.feature_grad_mult``
    (0.1: gradients into the conv stack are scaled by 0.1).
    """

    def __init__(self, encoder_cfg: EncoderConfig, cfg: PretrainConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg if cfg is not None else PretrainConfig()
        if not (cfg.w2v or cfg.cmsc):
            raise ValueError("at least one of w2v and cmsc must be enabled")
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
        self._compiled_heads = None  # Fusions.compile_heads: torch.compile(self.heads), built on first use

    def set_num_updates(self, num_updates: int, progress: float | None = None) -> None:
        """Set the optimizer-step counter (and, for a ``"run"`` temperature schedule, the run's progress in
        [0, 1]) that drive the Gumbel temperature."""
        self.quantizer.set_num_updates(num_updates, progress)

    def forward(
        self,
        x: Tensor,
        record: Tensor | None = None,
        mask: Tensor | None = None,
        negatives_idx: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> PretrainOutput:
        """One masked forward pass and its loss,
        ``contrastive_sum + S * (diversity_weight * diversity + features_pen_weight * features_pen)
        + S * cmsc_weight * cmsc`` with ``S = sample_size``, the local masked-frame count.

        Ablations: without W2V (``cfg.w2v`` False) nothing is masked, the contrastive, diversity and penalty
        terms are 0 and ``S = B``, so ``loss / S = cmsc_weight * cmsc``; without CMSC its term is dropped.

        Args:
            x: ``(B, in_channels, L)`` z-scored ECG segments (RLM already applied by the data side).
            record: ``(B,)`` long record id of every row (rows ``2i, 2i + 1`` are a CMSC pair; equal ids are
                positives); required with ``cfg.cmsc``.
            mask: optional precomputed ``(B, T)`` bool time mask (equal count per row, >= 2); drawn with
                :func:`compute_span_mask` otherwise.
            negatives_idx: optional ``(B, T', N)`` per-row negative indices (see :func:`sample_negative_indices`).
            generator: CPU generator for the mask, the negatives and the Gumbel noise (global RNG if None).
        """
        cfg = self.cfg
        if cfg.cmsc and record is None:
            raise ValueError("cfg.cmsc is on: the forward needs the record ids of the rows")
        features = self.encoder.conv_features(x)  # (B, T, C), grads scaled by feature_grad_mult
        features_pen = features.float().pow(2).mean()
        normed, h = self.encoder.project(features)
        zero = features_pen.new_zeros(())
        if cfg.w2v:
            x_out, logits, contrastive, mask, negatives_idx, qstats = self._masked(normed, h, mask, negatives_idx,
                                                                                   generator)
            ppl, code_ppl = qstats["prob_perplexity"], qstats["code_perplexity"]
            diversity = (self.quantizer.total_vars - ppl) / self.quantizer.total_vars
            sample_size = count = torch.full((), float(logits.shape[0] * logits.shape[1]), device=x.device)
            penalties = cfg.diversity_weight * diversity + cfg.features_pen_weight * features_pen
            loss = contrastive + sample_size * penalties
        else:
            x_out, logits = self.encoder.contextualize(h), None
            contrastive = ppl = code_ppl = diversity = count = loss = zero
            sample_size = torch.full((), float(x.shape[0]), device=x.device)
        cmsc = zero
        if cfg.cmsc:
            cmsc = cmsc_loss(x_out, record, cfg.cmsc_temp, gather=cfg.cmsc_gather, eps=cfg.cmsc_eps)
            loss = loss + sample_size * cfg.cmsc_weight * cmsc
        stats = PretrainStats(
            loss=loss.detach().float(), contrastive=contrastive.detach().float(), diversity=diversity.detach().float(),
            features_pen=features_pen.detach(), cmsc=cmsc.detach().float(), accuracy=infonce_correct(logits, zero),
            prob_perplexity=ppl.detach().float(), code_perplexity=code_ppl.float(), sample_size=sample_size,
            count=count)
        return PretrainOutput(loss, stats, x_out, logits, mask if cfg.w2v else None, negatives_idx if cfg.w2v else None)

    def _masked(self, normed: Tensor, h: Tensor, mask: Tensor | None, negatives_idx: Tensor | None,
                generator: torch.Generator | None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """The W2V half of :meth:`forward`: mask ``h (B, T, D)``, contextualise it, quantize the masked frames of
        ``normed (B, T, C)`` and score the predictions against them. Returns ``x_out (B, T, D)``, ``logits
        (B, T', 1+N)``, the summed InfoNCE, the mask and negatives used, and the quantizer's statistics."""
        cfg = self.cfg
        bsz, tsz, _ = normed.shape
        if mask is None:  # drawn on CPU, so checking it and locating its frames never waits for the GPU
            mask = compute_span_mask((bsz, tsz), cfg.mask_prob, cfg.mask_length, cfg.min_masks, generator=generator)
        counts = mask.sum(dim=1)
        if mask.shape != (bsz, tsz) or bool((counts != counts[0]).any()) or int(counts[0]) < 2:
            raise ValueError(f"mask must be (B, T)=({bsz}, {tsz}) with an equal count >= 2 of True per row")
        n_per_row = int(counts[0])
        # (B, T') indices of each row's masked frames, ascending: a gather with them selects what x[mask] does
        # without x[mask]'s device-to-host sync.
        positions = mask.nonzero()[:, 1].view(bsz, n_per_row).to(h.device, non_blocking=True)
        mask = mask.to(device=h.device, dtype=torch.bool, non_blocking=True)
        x_out = self.encoder.contextualize(torch.where(mask.unsqueeze(-1), self.mask_emb.to(h.dtype), h))

        # the random draws in the order of the eager heads: dropout, Gumbel noise, then the negatives
        dropped = self.dropout_features(normed)
        tau = self.quantizer.temperature_tensor(h.device)
        if FUSIONS.compile_heads:
            gumbels = self.quantizer.noise(positions.numel(), h.device, generator) if self.quantizer.training else None
            if negatives_idx is None:
                negatives_idx = sample_negative_indices(bsz, n_per_row, cfg.num_negatives, generator=generator,
                                                        device=h.device)
            logits, contrastive, qstats = self.compiled_heads()(dropped, x_out, positions, negatives_idx, tau,
                                                                gumbels)
            return x_out, logits, contrastive, mask, negatives_idx, qstats
        y, qstats = self.targets(dropped, positions, tau, generator=generator)
        if negatives_idx is None:
            negatives_idx = sample_negative_indices(bsz, n_per_row, cfg.num_negatives, generator=generator,
                                                    device=h.device)
        logits, contrastive = self.score(x_out, positions, y, negatives_idx)
        return x_out, logits, contrastive, mask, negatives_idx, qstats

    def targets(self, features: Tensor, positions: Tensor, tau: Tensor, gumbels: Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The contrastive targets: the quantized, projected masked frames ``y (B, T', F)`` of ``features (B, T,
        C)`` (the normalised conv features after ``dropout_features``) at ``positions (B, T')``, at Gumbel
        temperature ``tau`` (0-d), with the quantizer's statistics (see :meth:`GumbelVectorQuantizer.quantize`
        for ``gumbels`` and ``generator``)."""
        q, qstats = self.quantizer.quantize(_take_frames(features, positions), tau, gumbels, generator)
        return self.project_q(q), qstats

    def score(self, x_out: Tensor, positions: Tensor, y: Tensor, negatives_idx: Tensor) -> tuple[Tensor, Tensor]:
        """The predictions of the masked frames (``final_proj`` of ``x_out (B, T, D)`` at ``positions (B, T')``)
        against the targets ``y (B, T', F)`` and their negatives ``(B, T', N)``: ``logits (B, T', 1+N)`` float32
        and the summed InfoNCE (0-d)."""
        logits = contrastive_logits(self.final_proj(_take_frames(x_out, positions)), y, negatives_idx,
                                    self.cfg.logit_temp)
        return logits, contrastive_loss(logits)

    def heads(self, features: Tensor, x_out: Tensor, positions: Tensor, negatives_idx: Tensor, tau: Tensor,
              gumbels: Tensor | None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """:meth:`targets` and :meth:`score` in one function, every random draw given (``gumbels`` from
        :meth:`GumbelVectorQuantizer.noise` in training, None in eval): ``(logits, summed InfoNCE, quantizer
        statistics)``. What :data:`~ecgfm_cli.model.encoder.FUSIONS` ``.compile_heads`` compiles."""
        y, qstats = self.targets(features, positions, tau, gumbels)
        logits, contrastive = self.score(x_out, positions, y, negatives_idx)
        return logits, contrastive, qstats

    def compiled_heads(self) -> Callable[..., tuple[Tensor, Tensor, dict[str, Tensor]]]:
        """``torch.compile(self.heads, dynamic=True)``, built once per model: the batch size and the masked
        count T' change between updates and the temperature is a tensor input, so one compiled graph serves
        every update (tested). Default mode (the per-update shapes would re-record CUDA graphs)."""
        if self._compiled_heads is None:
            self._compiled_heads = torch.compile(self.heads, dynamic=True)
        return self._compiled_heads


def infonce_correct(logits: Tensor | None, zero: Tensor) -> Tensor:
    """fairseq's InfoNCE accuracy numerator: rows of ``logits (..., 1+N)`` whose positive (column 0) is the max
    and not also the min (a row of equal logits), float32 0-d; ``zero`` without logits."""
    if logits is None or not logits.numel():
        return zero
    with torch.no_grad():
        flat = logits.reshape(-1, logits.shape[-1])
        return ((flat.argmax(-1) == 0) & ~(flat.argmin(-1) == 0)).sum().float()


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
