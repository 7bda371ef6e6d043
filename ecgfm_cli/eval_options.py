"""What ``ecgfm probe`` and ``ecgfm evaluate`` take, as plain data (no numpy, no scikit-learn: the commands read
their defaults from here for ``--help``, so each default is written once; ``ecgfm_cli.probe`` and
``ecgfm_cli.evaluate`` use the same classes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

#: How ``ecgfm evaluate`` chooses each label's operating threshold on the valid split (``metrics.choose_threshold``).
ThresholdMethod = Literal["f1", "youden"]

#: ``--aggregate``: segment probabilities grouped by record with max, mean or min, or ``label`` (per-label rules).
Aggregate = Literal["max", "mean", "min", "label"]

#: Train, valid and test shares of a patient-grouped split when the labels have no split column (probe and
#: finetune alike, ``--split-fractions``).
SPLIT_FRACTIONS: tuple[float, float, float] = (0.8, 0.1, 0.1)


@dataclass
class ProbeOptions:
    """How ``ecgfm probe`` fits (see docs/commands/probe.md).

    split_fractions: train, valid, test shares of the patient-grouped split (used when the labels have no split
    column). seed: of that split, or of the folds. c_grid: inverse regularisation strengths tried for each logistic
    regression (the best valid average precision wins). alpha_grid: ridge alphas tried for continuous targets (the
    lowest valid MSE wins). max_iter: iteration limit of each logistic regression fit. folds: K-fold out-of-fold
    probing instead of one split (None: one split).
    """

    split_fractions: tuple[float, float, float] = SPLIT_FRACTIONS
    seed: int = 0
    c_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)
    alpha_grid: tuple[float, ...] = (1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1e3, 1e4)
    max_iter: int = 1000
    folds: int | None = None


@dataclass
class EvalConfig:
    """Settings of one evaluation (see ``ecgfm evaluate --help``)."""

    eval_split: str = "test"
    threshold_method: ThresholdMethod = "f1"
    n_boot: int = 1000
    seed: int = 0
    ci_level: float = 0.95
    calibrate: bool = False
    aggregate: Aggregate | None = None
    aggregate_methods: dict[str, str] = field(default_factory=dict)
    #: positive (and negative) patients a binary label needs for a reliable interval and a place in the macro
    min_positives: int = 3
    at_specificity: tuple[float, ...] = (0.9, 0.95)
    at_sensitivity: tuple[float, ...] = (0.9, 0.95)
    #: threshold probabilities of the decision curves
    dca_thresholds: tuple[float, ...] = tuple(round(0.01 * i, 2) for i in range(1, 100))
    #: a subgroup with fewer patients in the evaluated split is reported as too small
    min_subgroup: int = 20
    #: restrict the macro averages to these labels (subgroups: the labels reliable in every group); None = all
    macro_only: tuple[str, ...] | None = None
    #: upper-exclusive band edges of age (years) for subgroups
    age_bands: tuple[float, ...] = (40, 60, 80)


def csv_numbers(values: tuple[float, ...]) -> str:
    """A tuple of numbers as a command-line default, each in its shorter exact form: ``(0.9, 0.95)`` ->
    ``"0.9,0.95"``, ``(1e-4, 0.01, 1.0, 1e3)`` -> ``"1e-4,0.01,1,1e3"`` (``float`` reads back the same floats)."""
    def short(v: float) -> str:
        plain = repr(float(v)).removesuffix(".0")
        mantissa, exponent = f"{v:e}".split("e")
        sci = f"{mantissa.rstrip('0').removesuffix('.')}e{int(exponent)}"
        return sci if len(sci) < len(plain) and float(sci) == v else plain

    return ",".join(short(v) for v in values)
