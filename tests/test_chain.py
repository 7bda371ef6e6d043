"""The whole chain through the CLI and files, on the real labelled Challenge 2020/2021 records:

ingest -> segment -> pretrain (tiny) -> embed -> probe -> evaluate, and finetune -> evaluate --aggregate label.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.shared]


def ecgfm(*args, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "ecgfm_cli", *map(str, args)], input=stdin, capture_output=True,
                         timeout=600)
    assert res.returncode == 0, f"ecgfm {args[0]} failed:\n{res.stderr.decode()[-3000:]}"
    return res


@pytest.fixture(scope="module")
def chain(shared_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("chain")
    records = shared_data / "physionet_challenge_2020_2021" / "records"
    ingest = subprocess.run([sys.executable, "-m", "ecgfm_cli", "ingest", str(records)], capture_output=True,
                            timeout=600)
    assert ingest.returncode == 0, ingest.stderr.decode()
    assert b"144 records" in ingest.stderr
    ecgfm("segment", "-", "-o", out / "segments", stdin=ingest.stdout)
    ecgfm("pretrain", out / "segments", "--preset", "tiny", "--max-updates", "20", "--batch-size", "16",
          "--log-every", "10", "-o", out / "pretrain")
    return out


def metrics(path: Path) -> dict:
    report = json.loads(path.read_text())
    assert report["provenance"]["inputs"], "inputs are fingerprinted"
    return report


def test_pretrain_embed_probe_evaluate(chain):
    out = chain
    log = [json.loads(line) for line in (out / "pretrain" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["update"] == 20 and log[-1]["code_perplexity"] > 2
    ecgfm("embed", out / "segments", "--model", out / "pretrain", "-o", out / "emb.parquet")
    ecgfm("embed", out / "segments", "--random-init", "--preset", "tiny", "-o", out / "emb-random.npz")
    ecgfm("probe", out / "emb.parquet", "--labels", out / "segments", "--label-map", "challenge2021",
          "--baseline", out / "emb-random.npz", "-o", out / "probe.parquet")
    res = ecgfm("evaluate", out / "probe.parquet", "--labels", out / "segments", "--label-map", "challenge2021",
                "--aggregate", "max", "--bootstrap", "50", "--baseline", out / "probe.baseline.parquet",
                "-o", out / "probe.json")
    table = res.stdout.decode()
    assert "| **macro** |" in table and "record-level" in table and "baseline" in table
    report = metrics(out / "probe.json")
    assert set(report["levels"]) == {"segment", "record"}
    af = report["levels"]["record"]["labels"]["AF"]
    assert af["n"] > 0 and "auroc" in af


def test_finetune_evaluate_with_label_rules(chain):
    out = chain
    ecgfm("finetune", out / "segments", "--init", out / "pretrain", "--labels", out / "segments",
          "--label-map", "challenge2021", "--epochs", "2", "--batch-size", "32", "-o", out / "finetune")
    res = ecgfm("evaluate", out / "finetune" / "predictions.parquet", "--labels", out / "segments",
                "--label-map", "challenge2021", "--aggregate", "label", "--bootstrap", "50",
                "-o", out / "finetune.json")
    assert "record-level (aggregation: label)" in res.stdout.decode()
    report = metrics(out / "finetune.json")
    rules = report["levels"]["record"]["aggregation"]
    assert rules  # ECG-FM's per-label rules were applied (max for PVC/VT/pacing, mean otherwise)
