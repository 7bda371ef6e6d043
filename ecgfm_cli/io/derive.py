"""Derived limb leads for formats that store only the independent leads (8-lead I, II, V1-V6 carts)."""

from __future__ import annotations

import numpy as np

from ecgfm_cli.contract import canonical_lead

#: the four limb leads a cart derives from I and II (Einthoven and Goldberger)
DERIVED_LIMB = ("III", "aVR", "aVL", "aVF")


def derive_limb_leads(leads: list[str], signal: np.ndarray) -> tuple[list[str], np.ndarray, list[str]]:
    """Append III = II - I, aVR = -(I + II) / 2, aVL = I - II / 2, aVF = II - I / 2 when I and II are stored and
    none of the four is.

    signal: (n_leads, n_samples) float32 in physical units. Returns (leads, signal, derived names); the input is
    returned unchanged (derived names empty) when the record already has a limb lead or lacks I or II.
    """
    canon = [canonical_lead(n) for n in leads]
    if "I" not in canon or "II" not in canon or any(d in canon for d in DERIVED_LIMB):
        return leads, signal, []
    one = signal[canon.index("I")].astype(np.float64)
    two = signal[canon.index("II")].astype(np.float64)
    extra = np.stack([two - one, -(one + two) / 2, one - two / 2, two - one / 2]).astype(np.float32)
    return [*leads, *DERIVED_LIMB], np.concatenate([signal, extra]), list(DERIVED_LIMB)
