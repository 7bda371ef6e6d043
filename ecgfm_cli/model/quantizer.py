"""Gumbel-softmax product quantizer producing wav2vec 2.0 targets (fairseq ``GumbelVectorQuantizer`` semantics)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _perplexity(probs: Tensor) -> Tensor:
    """``exp(entropy)`` of each group's distribution, summed over groups: ``probs (G, V)`` -> scalar.

    Uses fairseq's ``p * log(p + 1e-7)`` form (not ``xlogy``) for parity with the reference.
    """
    return torch.exp(-torch.sum(probs * torch.log(probs + 1e-7), dim=-1)).sum()


def gumbel_noise(like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """i.i.d. standard Gumbel noise ``-log(-log U)``, ``U ~ U[0, 1)``, shaped, typed and placed as ``like``.

    The same distribution as ``F.gumbel_softmax``'s ``-log(Exp(1))``, from uniform draws: torch's CPU
    ``exponential_`` costs ~5x ``rand`` (a ``tiny`` training update spent ~6 % of its time on it). ``U == 0``
    (probability 2^-24 per draw in float32) gives ``-inf``, a code that cannot win that frame, the limit of the
    tail. ``generator``: a CPU generator also serves a GPU ``like`` (drawn on the CPU, then copied).
    """
    return gumbel_draw(like.shape, like.dtype, like.device, generator)


def gumbel_draw(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device,
                generator: torch.Generator | None = None) -> Tensor:
    """:func:`gumbel_noise` of a given shape, dtype and device (no tensor to imitate)."""
    if generator is not None and generator.device != torch.device(device):
        u = torch.rand(shape, dtype=dtype, generator=generator).to(device)
    else:
        u = torch.rand(shape, dtype=dtype, device=device, generator=generator)
    return u.log_().neg_().log_().neg_()


def straight_through(logits: Tensor, gumbels: Tensor, tau: Tensor | float) -> Tensor:
    """The straight-through hard sample of ``logits`` perturbed by given ``gumbels`` (same shape) at
    temperature ``tau`` (a 0-d tensor under ``torch.compile``: a float would be baked into the graph): forward
    one-hot (the argmax over the last dim), backward the soft sample's gradient."""
    soft = ((logits + gumbels) / tau).softmax(dim=-1)
    hard = torch.zeros_like(soft).scatter_(-1, soft.argmax(dim=-1, keepdim=True), 1.0)
    return hard - soft.detach() + soft


def gumbel_softmax_hard(logits: Tensor, tau: Tensor | float, generator: torch.Generator | None = None) -> Tensor:
    """Straight-through Gumbel-softmax over the last dim: forward is one-hot, backward is the soft sample's grad.

    Same estimator as ``F.gumbel_softmax(hard=True)``, with an optional generator for reproducible noise.
    """
    return straight_through(logits, gumbel_noise(logits, generator), tau)


class GumbelVectorQuantizer(nn.Module):
    """``groups`` codebooks of ``num_vars`` entries; a frame's code is the concat of one entry per group.

    Parameters (state-dict keys as in fairseq): ``vars (1, groups*num_vars, vq_dim/groups)`` init U[0, 1),
    ``weight_proj`` Linear(dim -> groups*num_vars) init N(0, 1), bias 0.

    ``num_updates`` is a plain attribute (not in the state dict, so fairseq checkpoints load strictly): the
    trainer sets it every update with :meth:`set_num_updates` and restores it from its step counter on resume.
    ``schedule`` ``"decay"`` is the reference temperature ``max(max_temp * decay ** num_updates, min_temp)``;
    ``"run"`` anneals geometrically from ``max_temp`` to ``min_temp`` across the run,
    ``max_temp * (min_temp / max_temp) ** progress``, the trainer setting ``progress`` in [0, 1] with the count.
    """

    def __init__(
        self,
        dim: int,
        num_vars: int = 320,
        groups: int = 2,
        vq_dim: int = 256,
        temp: tuple[float, float, float] = (2.0, 0.5, 0.999995),
        schedule: str = "decay",
    ) -> None:
        super().__init__()
        if vq_dim % groups:
            raise ValueError(f"vq_dim {vq_dim} must be divisible by groups {groups}")
        if schedule not in ("decay", "run"):
            raise ValueError(f"temperature schedule {schedule!r}: expected 'decay' or 'run'")
        self.schedule = schedule
        self.progress = 0.0
        self.groups = groups
        self.num_vars = num_vars
        self.vq_dim = vq_dim
        self.max_temp, self.min_temp, self.temp_decay = (float(t) for t in temp)
        self.vars = nn.Parameter(torch.empty(1, groups * num_vars, vq_dim // groups))
        self.weight_proj = nn.Linear(dim, groups * num_vars)
        self.num_updates = 0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.vars)
        nn.init.normal_(self.weight_proj.weight, mean=0.0, std=1.0)
        nn.init.zeros_(self.weight_proj.bias)

    @property
    def total_vars(self) -> int:
        """G * V, the normaliser of the diversity loss (640 for ECG-FM)."""
        return self.groups * self.num_vars

    @property
    def temperature(self) -> float:
        """Current Gumbel temperature (see the class docstring for the two schedules)."""
        if self.schedule == "run":
            return self.max_temp * (self.min_temp / self.max_temp) ** min(max(self.progress, 0.0), 1.0)
        return max(self.max_temp * self.temp_decay**self.num_updates, self.min_temp)

    def set_num_updates(self, num_updates: int, progress: float | None = None) -> None:
        self.num_updates = int(num_updates)
        if progress is not None:
            self.progress = float(progress)

    def temperature_tensor(self, device: torch.device | str) -> Tensor:
        """:attr:`temperature` as a 0-d float32 tensor on ``device``, made fresh each forward (one fill, no copy
        from the host). Compiled code takes it as an input, so a new temperature each update does not recompile
        it, as a Python float or the ``num_updates`` attribute read inside would. Not a registered buffer: the
        state dict keeps fairseq's keys, and DDP does not broadcast it every forward."""
        return torch.full((), self.temperature, dtype=torch.float32, device=device)

    def noise(self, frames: int, device: torch.device | str, generator: torch.Generator | None = None) -> Tensor:
        """The Gumbel noise :meth:`quantize` needs for ``frames`` (= B * T) frames in training: float32
        ``(frames, groups, num_vars)`` on ``device``, the draws :meth:`forward` would make."""
        return gumbel_draw((frames, self.groups, self.num_vars), torch.float32, device, generator)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Quantize ``x (B, T, dim)`` at the current temperature, the noise drawn here (see :meth:`quantize`)."""
        return self.quantize(x, self.temperature_tensor(x.device), generator=generator)

    def quantize(self, x: Tensor, tau: Tensor, gumbels: Tensor | None = None,
                 generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Quantize ``x (B, T, dim)`` at temperature ``tau`` (0-d tensor).

        Training: straight-through hard Gumbel-softmax, perturbed by ``gumbels`` (``(B*T, groups, num_vars)``
        float32, :meth:`noise`; compiled code takes them drawn) or else by noise drawn from ``generator``;
        eval: argmax one-hot. No host sync and no data-dependent shape, so it compiles to one graph.

        Returns:
            ``quantized (B, T, vq_dim)`` and stats: ``prob_perplexity`` (perplexity of the batch-averaged softmax,
            summed over groups; differentiable, drives the diversity loss), ``code_perplexity`` (of the argmax
            codes, no grad), ``temperature`` (0-d tensor), ``codes (B, T, groups)`` long argmax indices.
        """
        bsz, tsz, _ = x.shape
        logits = self.weight_proj(x).view(bsz * tsz, self.groups, self.num_vars)
        with torch.no_grad():
            codes = logits.argmax(dim=-1)  # (B*T, G)
            # the codes' frequencies by counting: the batch mean of their one-hot, without building it (a
            # scatter-add of ones, not bincount, whose output size depends on the data and breaks a graph)
            flat = (codes + torch.arange(self.groups, device=codes.device) * self.num_vars).view(-1)
            counts = torch.zeros(self.total_vars, dtype=torch.long, device=codes.device)
            counts = counts.scatter_add_(0, flat, torch.ones_like(flat))
            code_ppl = _perplexity(counts.view(self.groups, self.num_vars).float() / codes.shape[0])
        prob_ppl = _perplexity(logits.float().softmax(dim=-1).mean(dim=0))

        if self.training and gumbels is not None:
            onehot = straight_through(logits.float(), gumbels, tau).type_as(logits)
        elif self.training:
            onehot = gumbel_softmax_hard(logits.float(), tau, generator).type_as(logits)
        else:
            onehot = torch.zeros_like(logits).scatter_(-1, codes.unsqueeze(-1), 1.0)
        # (B*T, G, V) x (G, V, d) -> (B*T, G, d); a contraction instead of fairseq's broadcast-multiply-sum,
        # which materialises a (B*T, G, V, d) tensor.
        codebook = self.vars.view(self.groups, self.num_vars, -1)
        q = torch.einsum("ngv,gvd->ngd", onehot, codebook).reshape(bsz, tsz, self.vq_dim)
        stats = {
            "prob_perplexity": prob_ppl,
            "code_perplexity": code_ppl,
            "temperature": tau.detach().clone(),
            "codes": codes.view(bsz, tsz, self.groups),
        }
        return q, stats
