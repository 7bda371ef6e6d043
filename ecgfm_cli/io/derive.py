"""Derived limb leads for formats that store only the independent leads (8-lead I, II, V1-V6 carts)."""

from __future__ import annotations

import numpy as np

from ecgfm_cli.contract import canonical_lead

#: the four limb leads a cart derives from I and II (Einthoven and Goldberger)
DERIVED_LIMB = ("III", "aVR", "aVL", "aVF")


def derive_limb_leads(leads: list[str], counts: np.ndarray) -> tuple[list[str], np.ndarray, list[str]]:
    """Append III = II - I, aVR = -(I + II) / 2, aVL = I - II / 2, aVF = II - I / 2 when I and II are stored and
    none of the four is.

    counts: (n_leads, n_samples) integer ADC values sharing one amplitude resolution. aVR, aVL and aVF are
    half-integers of I's and II's counts, so when leads are derived every lead is returned in half-counts
    (x2, int64: exact, and still lossless for ``--store-digital``): the caller halves its resolution. Returns
    (leads, counts, derived names); the input is returned unchanged (derived names empty) when the record
    already has a limb lead or lacks I or II.
    """
    canon = [canonical_lead(n) for n in leads]
    if "I" not in canon or "II" not in canon or any(d in canon for d in DERIVED_LIMB):
        return leads, counts, []
    x = np.asarray(counts, np.int64)
    one, two = x[canon.index("I")], x[canon.index("II")]
    extra = np.stack([2 * (two - one), -(one + two), 2 * one - two, 2 * two - one])
    return [*leads, *DERIVED_LIMB], np.concatenate([2 * x, extra]), list(DERIVED_LIMB)
