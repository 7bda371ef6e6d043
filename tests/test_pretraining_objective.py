"""Pretraining objective (W2V + CMSC + RLM): masks, quantizer, negatives, losses, and parity with transformers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from ecgfm_cli.model.checkpoint import state_dict_from_fairseq
from ecgfm_cli.model.config import EncoderConfig, preset
from ecgfm_cli.model.masking import compute_span_mask
from ecgfm_cli.model.pretraining import (
    PretrainConfig,
    Wav2Vec2Pretrainer,
    cmsc_loss,
    contrastive_logits,
    contrastive_loss,
    pool_time,
    sample_negative_indices,
)
from ecgfm_cli.model.quantizer import GumbelVectorQuantizer

L = 2500  # 5 s at 500 Hz -> T = 156 frames


def to_fairseq_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our pretraining state -> fairseq's ``Wav2Vec2Model`` keys (the encoder's ``encoder.`` prefix dropped)."""
    return {k.removeprefix("encoder."): v for k, v in state.items()}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_model(seed: int = 0, **cfg_overrides) -> Wav2Vec2Pretrainer:
    torch.manual_seed(seed)
    return Wav2Vec2Pretrainer(preset("tiny"), PretrainConfig(**cfg_overrides))


def runs(row: torch.Tensor) -> list[int]:
    """Lengths of the runs of True in a 1-D bool tensor."""
    out, n = [], 0
    for v in row.tolist():
        if v:
            n += 1
        elif n:
            out.append(n)
            n = 0
    return out + ([n] if n else [])


# ------------------------------------------------------------------------------------------------ masks


def test_span_mask_single_row_is_union_of_full_spans():
    for seed in range(50):
        m = compute_span_mask((1, 156), generator=gen(seed))[0]
        # a single row is never sub-sampled: every run is a union of whole 10-frame spans
        assert all(r >= 10 for r in runs(m))
        assert 10 <= int(m.sum()) <= 11 * 10  # 10 or 11 spans
        assert not m[-1]  # starts are < T - 10, so the last frame is never covered


def test_span_mask_expected_fraction_and_equalisation():
    counts = torch.stack([compute_span_mask((1, 156), generator=gen(s)).sum() for s in range(300)]).float()
    assert 70 < counts.mean() < 84  # reference simulation: ~77/156 before equalisation
    m = compute_span_mask((128, 156), generator=gen(1))
    per_row = m.sum(1)
    assert (per_row == per_row[0]).all()
    assert 0.28 < per_row[0] / 156 < 0.42  # ~35 % after equalising over 128 segments


def test_span_mask_min_masks_and_edge_cases():
    m = compute_span_mask((1, 156), mask_prob=1e-4, generator=gen(0))
    assert 10 < int(m.sum()) <= 20  # 2 spans of 10 (possibly overlapping)
    assert not compute_span_mask((3, 156), mask_prob=0.0).any()
    short = compute_span_mask((4, 12), generator=gen(0))  # spans do not fit: start range is shrunk
    assert short.shape == (4, 12) and (short.sum(1) == short.sum(1)[0]).all() and short.sum(1)[0] >= 2


def test_span_mask_determinism():
    a = compute_span_mask((8, 156), generator=gen(3))
    b = compute_span_mask((8, 156), generator=gen(3))
    c = compute_span_mask((8, 156), generator=gen(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------------------ fairseq's formulation (reference)


def gather_negatives(y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """fairseq's materialised negatives: ``y (B, T', F)``, ``idx (B, T', N)`` per-row indices -> ``(N, B, T', F)``."""
    bsz, tsz, dim = y.shape
    flat = idx + torch.arange(bsz)[:, None, None] * tsz
    return y.reshape(-1, dim)[flat.reshape(-1)].view(*idx.shape, dim).permute(2, 0, 1, 3)


def materialised_logits(pred: torch.Tensor, pos: torch.Tensor, negs: torch.Tensor, logit_temp: float = 0.1
                        ) -> torch.Tensor:
    """fairseq's ``compute_preds``: cosine of ``pred (B, T', F)`` with ``pos (B, T', F)`` and ``negs (N, B, T', F)``
    / temperature, ``-inf`` where a negative equals the positive -> ``(B, T', 1 + N)``."""
    neg_is_pos = (pos.unsqueeze(0) == negs).all(-1)  # (N, B, T')
    targets = torch.cat([pos.unsqueeze(0), negs], dim=0)
    logits = torch.nn.functional.cosine_similarity(pred.float(), targets.float(), dim=-1) / logit_temp
    logits = torch.cat([logits[:1], logits[1:].masked_fill(neg_is_pos, float("-inf"))], dim=0)
    return logits.permute(1, 2, 0)


# ------------------------------------------------------------------------------------------------ negatives


def test_negatives_exclude_self_and_stay_in_row():
    bsz, tm, n = 5, 40, 100
    idx = sample_negative_indices(bsz, tm, n, generator=gen(0))
    assert idx.shape == (bsz, tm, n) and idx.min() >= 0 and idx.max() < tm
    assert not (idx == torch.arange(tm)[None, :, None]).any()
    # uniform over the other T'-1 frames: each is drawn ~ N / (T'-1) times per frame
    own = torch.arange(tm)[None, :, None].expand(bsz, -1, n)
    hits = torch.zeros(tm, tm).index_put_((own.reshape(-1), idx.reshape(-1)), torch.tensor(1.0), accumulate=True)
    off_diag = hits[~torch.eye(tm, dtype=torch.bool)]
    expected = bsz * n / (tm - 1)
    assert off_diag.min() >= 1 and off_diag.max() < 3 * expected
    # values encode (row, frame): the lookup must come from the same row at the drawn frame
    y = (torch.arange(bsz)[:, None, None] * 1000 + torch.arange(tm)[None, :, None]).float().expand(-1, -1, 3)
    negs = gather_negatives(y, idx)
    assert negs.shape == (n, bsz, tm, 3)
    assert torch.equal(negs[..., 0], (torch.arange(bsz)[:, None, None] * 1000 + idx).permute(2, 0, 1).float())
    assert torch.equal(sample_negative_indices(bsz, tm, n, generator=gen(0)), idx)  # same generator, same draw
    with pytest.raises(ValueError):
        sample_negative_indices(2, 1, 10)


def test_similarities_stay_float32_under_bf16_autocast():
    """fairseq computes both contrastive similarities in float32 (cosine_similarity of .float() inputs); under
    bf16 autocast a plain bmm would round the logits (/ 0.1) by up to ~0.03 and move the CMSC loss."""
    g = gen(3)
    pred, y = torch.randn(4, 20, 32, generator=g), torch.randn(4, 20, 32, generator=g)
    idx = sample_negative_indices(4, 20, 10, generator=gen(4))
    x_out, rec = torch.randn(8, 6, 32, generator=g), torch.arange(8) // 2
    want_logits, want_cmsc = contrastive_logits(pred, y, idx), cmsc_loss(x_out, rec)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_logits, got_cmsc = contrastive_logits(pred, y, idx), cmsc_loss(x_out, rec)
    assert got_logits.dtype == torch.float32
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_cmsc, want_cmsc, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="at least one pair"):
        cmsc_loss(x_out[:1], rec[:1])


def test_contrastive_logits_neg_equal_pos_is_masked():
    """The reference form: column 0 the positive's cosine / temperature, a negative equal to it -inf."""
    torch.manual_seed(0)
    pred, pos = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    negs = torch.randn(3, 2, 4, 8)
    negs[1, 0, 2] = pos[0, 2]
    logits = materialised_logits(pred, pos, negs, 0.1)
    assert logits.shape == (2, 4, 4)
    assert torch.isinf(logits[0, 2, 2]) and torch.isfinite(logits).sum() == logits.numel() - 1
    cos = torch.nn.functional.cosine_similarity(pred[1, 3], pos[1, 3], dim=-1)
    assert torch.allclose(logits[1, 3, 0], cos / 0.1)
    expected = -sum(logits[b, t].log_softmax(-1)[0] for b in range(2) for t in range(4))
    assert torch.allclose(contrastive_loss(logits), expected)


# ------------------------------------------------------------------------------------------------ quantizer


def test_temperature_schedule():
    q = GumbelVectorQuantizer(8, num_vars=4, groups=2, vq_dim=4)
    assert q.temperature == 2.0
    q.set_num_updates(1000)
    assert math.isclose(q.temperature, 2.0 * 0.999995**1000)
    q.set_num_updates(277_000)  # 2 * 0.999995^n hits 0.5 at n ~= 277,258
    assert q.temperature > 0.5
    q.set_num_updates(278_000)
    assert q.temperature == 0.5
    assert "num_updates" not in str(list(q.state_dict()))  # fairseq checkpoints load strictly


def test_quantizer_init_eval_and_train():
    q = GumbelVectorQuantizer(256)  # reference sizes: 164,480 + 81,920 parameters
    assert sum(p.numel() for p in q.parameters()) == 164_480 + 81_920
    assert q.vars.min() >= 0 and q.vars.max() < 1 and q.weight_proj.bias.abs().max() == 0
    assert 0.9 < q.weight_proj.weight.std() < 1.1
    x = torch.randn(3, 7, 256)
    q.eval()
    out, st = q(x)
    codes = st["codes"]
    expected = torch.cat([q.vars[0, codes[..., 0]], q.vars[0, 320 + codes[..., 1]]], dim=-1)
    assert torch.equal(out, expected)
    assert 1 <= st["code_perplexity"] <= 640 and 1 <= st["prob_perplexity"] <= 640
    q.train()
    out_a, _ = q(x, generator=gen(1))
    out_b, _ = q(x, generator=gen(1))
    assert torch.equal(out_a, out_b)
    out_a.sum().backward()
    assert q.weight_proj.weight.grad.abs().sum() > 0  # straight-through estimator


def test_diversity_loss_range():
    q = GumbelVectorQuantizer(16, num_vars=8, groups=2, vq_dim=4)
    _, st = q(torch.randn(2, 50, 16))
    div = (q.total_vars - st["prob_perplexity"]) / q.total_vars
    assert 0 <= div < 1
    # collapsed logits -> perplexity 1 per group -> diversity (GV - G) / GV
    with torch.no_grad():
        q.weight_proj.weight.zero_()
        q.weight_proj.bias.copy_(torch.tensor([50.0] + [0.0] * 7 + [50.0] + [0.0] * 7))
    _, st = q(torch.randn(2, 50, 16))
    assert math.isclose(st["prob_perplexity"].item(), 2.0, rel_tol=1e-4)
    # uniform logits -> perplexity V per group -> diversity 0
    with torch.no_grad():
        q.weight_proj.bias.zero_()
    _, st = q(torch.randn(2, 50, 16))
    assert math.isclose(st["prob_perplexity"].item(), 16.0, rel_tol=1e-4)


# ------------------------------------------------------------------------------------------------ model


def test_model_forward_outputs_and_init():
    m = tiny_model()
    assert m.mask_emb.min() >= 0 and m.mask_emb.max() < 1
    assert m.encoder.cfg.feature_grad_mult == 0.1
    x, ids = torch.randn(4, 12, L), torch.tensor([0, 0, 1, 1])
    out = m(x, ids, generator=gen(0))
    tm = int(out.mask.sum(1)[0])
    assert out.x_out.shape == (4, 156, 64)
    assert out.logits.shape == (4, tm, 101) and out.negatives_idx.shape == (4, tm, 100)
    assert int(out.stats.sample_size) == 4 * tm
    assert torch.isfinite(out.stats.contrastive) and out.stats.contrastive > 0
    assert 0 <= out.stats.diversity < 1 and out.stats.features_pen > 0
    assert m.quantizer.temperature == 2.0
    with pytest.raises(ValueError):
        bad = torch.zeros(4, 156, dtype=torch.bool)
        bad[0, :5] = True
        m(x, ids, mask=bad)
    with pytest.raises(ValueError, match="record ids"):  # CMSC needs to know which rows pair up
        m(x)


def test_fixed_mask_and_negatives_and_determinism():
    m = tiny_model()
    x = torch.randn(2, 12, L)
    mask = compute_span_mask((2, 156), generator=gen(1))
    m.train()
    torch.manual_seed(5)
    ids = torch.tensor([0, 0])
    a = m(x, ids, mask=mask, generator=gen(2))
    torch.manual_seed(5)
    b = m(x, ids, mask=mask, generator=gen(2))
    assert torch.equal(a.stats.contrastive, b.stats.contrastive) and torch.equal(a.x_out, b.x_out)
    assert torch.equal(a.mask, mask)
    m.eval()
    c = m(x, ids, mask=mask, negatives_idx=a.negatives_idx)
    d = m(x, ids, mask=mask, negatives_idx=a.negatives_idx)
    assert torch.equal(c.stats.contrastive, d.stats.contrastive)


def test_feature_grad_mult_scales_conv_grads():
    x = torch.randn(2, 12, L)
    mask = compute_span_mask((2, 156), generator=gen(0))
    neg = sample_negative_indices(2, int(mask.sum(1)[0]), 100, generator=gen(1))
    grads = {}
    for mult in (1.0, 0.1):
        m = tiny_model(seed=0, feature_grad_mult=mult).eval()  # eval: no dropout, argmax codes
        m(x, torch.tensor([0, 0]), mask=mask, negatives_idx=neg).loss.backward()
        grads[mult] = {k: p.grad.clone() for k, p in m.named_parameters()}
    conv = [k for k in grads[1.0] if ".feature_extractor." in k]
    assert conv
    for k, g in grads[1.0].items():
        expect = g * 0.1 if k in conv else g
        # the conv stack computes GroupNorm/GELU in fp32, so compare by relative norm, not elementwise
        assert (grads[0.1][k] - expect).norm() <= 1e-5 * expect.norm(), k


def test_state_dict_roundtrip_fairseq_keys():
    m = tiny_model()
    fs = to_fairseq_state_dict(m.state_dict())
    for key in ("mask_emb", "quantizer.vars", "quantizer.weight_proj.weight", "project_q.weight",
                "final_proj.weight", "feature_extractor.conv_layers.0.0.weight", "post_extract_proj.weight",
                "encoder.layers.0.self_attn.q_proj.weight", "encoder.layer_norm.weight"):
        assert key in fs, key
    m2 = tiny_model(seed=1)
    kind, ours = state_dict_from_fairseq(fs)
    assert kind == "pretraining"
    m2.load_state_dict(ours, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values(), strict=True))


# ------------------------------------------------------------------------------------------------ CMSC


def test_cmsc_identical_pairs_beat_random():
    torch.manual_seed(0)
    base = torch.randn(8, 20, 16)
    paired = base.repeat_interleave(2, dim=0)  # rows 2i, 2i+1 identical
    ids = torch.arange(8).repeat_interleave(2)
    same = cmsc_loss(paired, ids)
    rand = cmsc_loss(torch.randn(16, 20, 16), ids)
    assert same < rand
    assert same < 0.1 * math.log(8)
    # explicit index tensors give the same value as the interleaved default
    order = torch.randperm(16)
    inv = torch.argsort(order)
    shuffled = paired[order]
    alt = cmsc_loss(shuffled, ids[order], first=inv[0::2], second=inv[1::2])
    assert torch.allclose(alt, same)


def test_cmsc_same_record_pairs_are_positives():
    torch.manual_seed(0)
    x = torch.randn(4, 10, 6)
    ids = torch.tensor([7, 7, 7, 7])  # two pairs of the same record: every cell is a positive
    z = pool_time(x)
    z = z / z.norm(dim=-1, keepdim=True)
    s = z[0::2] @ z[1::2].T / 0.1
    expected = 0.5 * (-s.log_softmax(1)).mean() + 0.5 * (-s.T.log_softmax(1)).mean()
    assert torch.allclose(cmsc_loss(x, ids), expected, atol=1e-6)


def test_pool_time_matches_reference_and_guards_zero():
    x = torch.randn(2, 5, 3)
    x[0, 1, 0] = 0.0
    x[1, :, 2] = 0.0
    p = pool_time(x)
    assert torch.allclose(p[0, 0], x[0, :, 0].sum() / 4)
    assert p[1, 2] == 0 and torch.isfinite(p).all()


def test_cmsc_gather_keeps_local_grad(monkeypatch):
    """Simulated 2-rank all-gather: per-rank losses equal the full-batch loss and the rank gradients sum to
    the full-batch gradient (gradient only through the local slice)."""
    torch.manual_seed(0)
    full = torch.randn(8, 6, 5)
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    ref_x = full.clone().requires_grad_(True)
    ref = cmsc_loss(ref_x, ids)
    ref.backward()

    # the order in which cmsc_loss gathers: z0, z1, id0, id1
    z = pool_time(full)
    z = z / z.norm(dim=-1, keepdim=True)
    gathered = [z[0::2], z[1::2], ids[0::2], ids[1::2]]
    grad_sum = torch.zeros_like(full)
    for rank in range(2):
        calls = iter(gathered)

        def fake_all_gather(parts, t, rank=rank, calls=calls):
            src = next(calls)
            for r, chunk in enumerate(src.chunk(2)):
                parts[r].copy_(chunk)
            assert torch.equal(t, src.chunk(2)[rank].to(t.dtype))

        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda: 2)
        monkeypatch.setattr(dist, "get_rank", lambda rank=rank: rank)
        monkeypatch.setattr(dist, "all_gather", fake_all_gather)
        local = full[4 * rank: 4 * rank + 4].clone().requires_grad_(True)
        loss = cmsc_loss(local, ids[4 * rank: 4 * rank + 4], gather=True)
        assert torch.allclose(loss, ref, atol=1e-6)
        loss.backward()
        grad_sum[4 * rank: 4 * rank + 4] = local.grad
    monkeypatch.undo()
    assert torch.allclose(grad_sum, ref_x.grad, atol=1e-6)
    # not distributed: gather is a no-op
    assert torch.allclose(cmsc_loss(full, ids, gather=True), ref)


# ------------------------------------------------------------------------------------------------ combination


def test_loss_combination_and_ablations():
    x = torch.randn(4, 12, L)
    ids = torch.tensor([0, 0, 1, 1])
    m = tiny_model().eval()
    out = m(x, ids, generator=gen(0))
    c = cmsc_loss(out.x_out, ids)
    st, s = out.stats, out.stats.sample_size
    expect = st.contrastive + s * (0.1 * st.diversity + 10 * st.features_pen) + s * c
    assert torch.allclose(out.loss, expect) and s == int(out.mask.sum()) and st.loss == out.loss
    assert 0 <= st.accuracy <= st.count == s and torch.allclose(st.cmsc, c)

    m.cfg = PretrainConfig(cmsc=False)  # the same weights, mask and negatives; the objective without CMSC
    out_nc = m(x, generator=gen(0))
    assert torch.allclose(out_nc.loss, expect - s * c) and out_nc.stats.cmsc == 0

    m_cmsc = tiny_model(w2v=False).eval()
    out2 = m_cmsc(x, ids)
    assert out2.mask is None and out2.logits is None and int(out2.stats.count) == 0
    assert torch.allclose(out2.x_out, m_cmsc.encoder(x))  # no masking at all
    c2 = cmsc_loss(out2.x_out, ids)
    assert out2.stats.sample_size == 4 and torch.allclose(out2.loss / out2.stats.sample_size, c2)
    out2.loss.backward()

    with pytest.raises(ValueError):
        tiny_model(w2v=False, cmsc=False)
    with pytest.raises(ValueError):
        tiny_model()(x)  # CMSC without the record ids
    assert PretrainConfig().rlm and PretrainConfig(rlm=False).rlm is False


# ------------------------------------------------------------------------------------------------ parity


def test_contrastive_loss_matches_transformers():
    """transformers' Wav2Vec2ForPreTraining computes the same InfoNCE sum from the same weights, mask and
    negatives (eval mode: no dropout, argmax codes).

    Differences reconciled here (test side only): transformers quantizes every frame and masks unmasked frames
    out of the loss (target -100) and the perplexity, fairseq/ecgfm quantize only the masked frames; in eval
    both use argmax codes per frame, so the targets, the neg == pos mask and the InfoNCE sum coincide.
    transformers takes negatives as flat indices into B*T at the positive's own frame; we convert ours.
    transformers' eval perplexity is the argmax-code perplexity (xlogy), i.e. our ``code_perplexity``."""
    pytest.importorskip("transformers")
    from hf_reference import build_hf_model, fairseq_to_hf_state

    enc_cfg: EncoderConfig = preset("tiny")
    torch.manual_seed(0)
    ours = Wav2Vec2Pretrainer(enc_cfg, PretrainConfig()).eval()
    with torch.no_grad():  # few distinct codes, so some negatives equal their positive (-inf path)
        ours.quantizer.weight_proj.weight.mul_(0.2)
        ours.quantizer.weight_proj.bias.normal_(0.0, 1.0)
    hf = build_hf_model(enc_cfg, pretraining=True, latent_groups=2, latent_vars=320, latent_dim=256,
                        final_dim=256)
    hf.load_state_dict(fairseq_to_hf_state(to_fairseq_state_dict(ours.state_dict()), prefix="wav2vec2."),
                       strict=True)

    bsz = 3
    x = torch.randn(bsz, 12, L, generator=gen(1))
    mask = compute_span_mask((bsz, 156), generator=gen(2))
    tm = int(mask.sum(1)[0])
    neg = sample_negative_indices(bsz, tm, 100, generator=gen(3))
    # HF takes (B, T, N) flat indices into B*T over the full sequence, at the positive's own position
    pos = torch.stack([row.nonzero().squeeze(1) for row in mask])  # (B, T') masked positions
    flat = torch.zeros(bsz, 156, 100, dtype=torch.long)
    for b in range(bsz):
        flat[b, pos[b]] = b * 156 + pos[b][neg[b]]

    with torch.no_grad():
        out = ours(x, torch.arange(bsz), mask=mask, negatives_idx=neg)
        ref = hf(x, mask_time_indices=mask, sampled_negative_indices=flat)

    n_inf = int(torch.isinf(out.logits).sum())
    assert 0 < n_inf < out.logits.numel() // 10  # the neg == pos masking is exercised
    ours_sum, ref_sum = out.stats.contrastive.item(), ref.contrastive_loss.item()
    assert math.isclose(ours_sum, ref_sum, rel_tol=1e-4), (ours_sum, ref_sum)
    # eval-mode perplexity over masked frames = our code (argmax) perplexity
    assert math.isclose(out.stats.code_perplexity.item(), ref.codevector_perplexity.item(), rel_tol=1e-4)
    # predictions and targets agree frame by frame
    ours_pred = ours.final_proj(out.x_out[mask].view(bsz, tm, -1))
    ref_pred = ref.projected_states[mask].view(bsz, tm, -1)
    assert (ours_pred - ref_pred).abs().max() < 1e-5, (ours_pred - ref_pred).abs().max()


def test_indexed_logits_equal_materialised_negatives_values_and_gradients():
    g = torch.Generator().manual_seed(3)
    pred = torch.randn(3, 12, 8, generator=g, requires_grad=True)
    y = torch.randn(3, 12, 8, generator=g)
    y[:, 5] = y[:, 2]  # a negative equal to the positive must become -inf in both forms
    y.requires_grad_(True)
    idx = sample_negative_indices(3, 12, 20, generator=g)
    ref = materialised_logits(pred, y, gather_negatives(y, idx), 0.1)
    got = contrastive_logits(pred, y, idx, 0.1)
    assert torch.equal(torch.isinf(ref), torch.isinf(got)) and torch.isinf(got).any()
    finite = torch.isfinite(ref)
    torch.testing.assert_close(got[finite], ref[finite], atol=1e-5, rtol=1e-5)
    g_ref = torch.autograd.grad(contrastive_loss(ref), (pred, y))
    g_got = torch.autograd.grad(contrastive_loss(got), (pred, y))
    for a, b in zip(g_ref, g_got, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
