"""Every label column survives `segment` (issue #16.1): the user's `ingest --labels` columns and the yes/no labels
the headers state (`# Chagas label: True`), through a pipe and through a records directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ecgfm_cli.labels import load_labels

ECGFM = [sys.executable, "-m", "ecgfm_cli"]


def _user_csv(path: Path) -> Path:
    # 111102 states "Chagas label: True" in its header, the others False; 1111009 has no row here; the user's
    # patient_id fills in nothing (the headers name patients) but must not replace them
    path.write_text("record_id,af,lvef,site\n1111,1,55,a\n1111004,0,60.5,b\n111102,0,35,c\n")
    return path


def _labels(seg_dir: Path) -> dict[str, dict]:
    rows = pq.read_table(seg_dir / "labels-s00000of00001.parquet").to_pylist()
    return {r["record_id"]: r for r in rows}


def _check(labels: dict[str, dict]) -> None:
    assert set(labels) == {"1111", "1111004", "1111009", "111102"}
    assert {k: v["chagas"] for k, v in labels.items()} == {"1111": 0.0, "1111004": 0.0, "1111009": 0.0,
                                                           "111102": 1.0}
    assert labels["1111"]["af"] == 1 and labels["1111004"]["lvef"] == 60.5 and labels["111102"]["site"] == "c"
    assert labels["1111009"]["af"] is None and labels["1111009"]["lvef"] is None  # no row: unknown, not 0
    assert labels["1111"]["patient_id"] == "48705"


def test_pipe_keeps_user_and_header_labels(sample_data, tmp_path):
    csv = _user_csv(tmp_path / "my.csv")
    ingest = subprocess.Popen([*ECGFM, "ingest", str(sample_data / "code15_wfdb"), "--labels", str(csv)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seg = subprocess.run([*ECGFM, "segment", "-", "-o", str(tmp_path / "seg")], stdin=ingest.stdout,
                         capture_output=True, text=True)
    ingest.stdout.close()
    assert ingest.wait() == 0, ingest.stderr.read().decode()
    assert seg.returncode == 0, seg.stderr
    labels = _labels(tmp_path / "seg")
    _check(labels)
    # and the downstream commands take them as labels without --label-map
    table = load_labels(tmp_path / "seg")
    assert {"chagas", "af", "lvef"} <= set(table.labels)


@pytest.mark.parametrize("workers", [1, 2])
def test_records_dir_keeps_user_and_header_labels(sample_data, tmp_path, workers):
    csv = _user_csv(tmp_path / "my.csv")
    rec = tmp_path / "rec"
    assert subprocess.run([*ECGFM, "ingest", str(sample_data / "code15_wfdb"), "--labels", str(csv), "-o",
                           str(rec)], capture_output=True).returncode == 0
    seg = tmp_path / "seg"
    assert subprocess.run([*ECGFM, "segment", str(rec), "-o", str(seg), "--workers", str(workers)],
                          capture_output=True).returncode == 0
    _check(_labels(seg))


def test_records_without_carried_column_take_the_labels_table_beside_them(sample_data, tmp_path):
    """A records directory from before the user_labels column: ingest's labels table beside it is merged."""
    from ecgfm_cli.labels import USER_LABELS_COLUMN

    csv = _user_csv(tmp_path / "my.csv")
    rec = tmp_path / "rec"
    assert subprocess.run([*ECGFM, "ingest", str(sample_data / "code15_wfdb"), "--labels", str(csv), "-o",
                           str(rec)], capture_output=True).returncode == 0
    for part in rec.glob("records-*.parquet"):
        t = pq.read_table(part)
        t = t.drop_columns([USER_LABELS_COLUMN])
        pq.write_table(t.replace_schema_metadata(t.schema.metadata), part)
        assert USER_LABELS_COLUMN not in pq.read_schema(part).names
    seg = tmp_path / "seg"
    res = subprocess.run([*ECGFM, "segment", str(rec), "-o", str(seg)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    _check(_labels(seg))
