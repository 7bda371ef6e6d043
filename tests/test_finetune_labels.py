"""finetune's pre-flight (no training): small splits said loudly with counts (#16.12), two-valued labels not
coded 0/1 refused unless `--continuous` (#16.10)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ecgfm_cli.errors import EcgfmError
from ecgfm_cli.train.finetune import FinetuneOptions, prepare


@pytest.fixture(scope="module")
def segments(challenge_segments: Path) -> Path:
    """The 22 Challenge 2021 sample records' segments (the session's: read only)."""
    return challenge_segments


def _labels(segments: Path, path: Path, coding: tuple[int, int]) -> Path:
    ids = pq.read_table(next(segments.glob("labels-*.parquet")), columns=["record_id"]).column(0).to_pylist()
    lo, hi = coding
    path.write_text("record_id,sex,age\n" + "".join(f"{r},{hi if i % 3 == 0 else lo},{40 + i}\n"
                                                     for i, r in enumerate(ids)))
    return path


def _opts(segments: Path, labels: Path, out: Path, **kw) -> FinetuneOptions:
    return FinetuneOptions(segments=str(segments), labels=str(labels), output=str(out), random_init=True,
                           preset="tiny", **kw)


def test_two_valued_label_refused_then_continuous_on_request(segments, tmp_path):
    labels = _labels(segments, tmp_path / "l.csv", (1, 2))
    with pytest.raises(EcgfmError, match=r"'sex' \(1/2\).*--continuous sex"):
        prepare(_opts(segments, labels, tmp_path / "run"))
    prep = prepare(_opts(segments, labels, tmp_path / "run", continuous=("sex",)))
    assert prep.kinds == {"sex": "continuous", "age": "continuous"}
    assert any("continuous targets" in n and "sex (1 to 2, 2 distinct values)" in n for n in prep.notes)
    # --targets: only the labels fitted are checked
    prep = prepare(_opts(segments, labels, tmp_path / "run", targets=("age",)))
    assert prep.kinds == {"age": "continuous"}


def test_small_splits_warned_with_counts(segments, tmp_path):
    labels = _labels(segments, tmp_path / "l.csv", (0, 1))
    prep = prepare(_opts(segments, labels, tmp_path / "run"))
    assert prep.kinds["sex"] == "binary"
    warn = [n for n in prep.notes if n.startswith("WARNING")]
    assert any("too small" in n and "sex" in n for n in warn), prep.notes
    assert any("counts per split" in n and "patients" in n for n in warn), prep.notes
    assert any("--folds" in n for n in warn), prep.notes
    assert "valid" in prep.counts["split_counts"] and "test" in prep.counts["split_counts"]
