"""The experiment scripts (scripts/experiments/, docs/experiments.md) around a stand-in `ecgfm`: which commands they
run, with which options, and that a rerun skips every step whose output is newer than its input. The stand-in
(ECGFM=...) records its command line and writes a minimal output; the tables come from the real summarize.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts" / "experiments"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="the experiment scripts are bash")

# Writes a report summarize.py reads (both levels; AF and sex/age targets) for `evaluate`, an empty file otherwise.
STAND_IN = """#!{python}
import json, os, sys
args = sys.argv[1:]
with open(os.environ["ECGFM_CALLS"], "a") as fh:
    fh.write(json.dumps(args) + "\\n")
out = args[args.index("-o") + 1]
labels = {{"AF": {{"status": "evaluated", "auroc": {{"value": 0.75}}, "n_pos": 9}},
          "male": {{"auroc": {{"value": 0.6}}}}, "age": {{"r2": {{"value": 0.1}}}}}}
with open(out, "w") as fh:
    fh.write(json.dumps({{"levels": {{"record": {{"labels": labels}}, "segment": {{"labels": labels}}}}}})
               if args[0] == "evaluate" else "")
"""


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """An experiments OUT whose data is prepared (done markers, labels, demographics), with a stand-in ecgfm."""
    out = tmp_path / "out"
    for d in ("data/pretrain-segments", "data/eval-segments", "data/eval-records"):
        (out / d).mkdir(parents=True)
    for f in ("data/pretrain-segments/_done-s00000of00001.json", "data/eval-segments/_done-s00000of00001.json",
              "data/eval-records/labels-s00000of00001.parquet", "data/eval-demographics.csv"):
        (out / f).write_text("")
    stand_in = tmp_path / "ecgfm"
    stand_in.write_text(STAND_IN.format(python=sys.executable))
    stand_in.chmod(0o755)
    return out


def run(script: str, out: Path, *args: str, **env: str) -> tuple[list[list[str]], str]:
    """Run ``scripts/experiments/SCRIPT ARGS`` on ``out``: (the stand-in's command lines, stdout)."""
    calls = out.parent / "calls.jsonl"
    calls.write_text("")
    inherited = {k: v for k, v in os.environ.items() if k not in ("FORCE", "REEMBED", "PROBE_ONLY", "FOLD_SEEDS")}
    env = {**inherited, "OUT": str(out), "ECGFM": str(out.parent / "ecgfm"), "PY": sys.executable,
           "ECGFM_CALLS": str(calls), "DATA": str(out.parent / "no-data"), **env}
    res = subprocess.run(["bash", str(SCRIPTS / script), *args], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return [json.loads(line) for line in calls.read_text().splitlines()], res.stdout


def age(*paths: Path, seconds: float) -> None:
    """Set the modification time of ``paths`` to ``seconds`` ago."""
    t = time.time() - seconds
    for p in paths:
        os.utime(p, (t, t))


def test_fold_noise_probes_each_seed_once_with_the_common_commands(out: Path) -> None:
    """Per fold seed: the Challenge-2021 probe and evaluation and the demographics ones, as common.sh runs them
    (plus --seed S), into an OUT that has no probe/ folder yet; a rerun does nothing until the embeddings change."""
    emb = out / "emb" / "enc.parquet"
    emb.parent.mkdir()
    emb.write_text("")
    (out / "eval").mkdir()
    for f in ("enc.json", "enc.demo.json"):  # seed 0: the script that made the embeddings probed them
        (out / "eval" / f).write_text(json.dumps({"levels": {"record": {"labels": {
            "AF": {"status": "evaluated", "auroc": {"value": 0.5}, "n_pos": 9}, "male": {"auroc": {"value": 0.5}}}}}}))
    age(emb, seconds=100)
    calls, table = run("fold_noise.sh", out, "enc", FOLD_SEEDS="1 2")
    labels, demo = str(out / "data/eval-records/labels-s00000of00001.parquet"), str(out / "data/eval-demographics.csv")
    p, e = str(out / "probe" / "enc-folds1"), str(out / "eval" / "enc-folds1")
    assert calls[:4] == [
        ["probe", str(emb), "--labels", labels, "--label-map", "challenge2021", "--folds", "5", "--seed", "1",
         "-o", f"{p}.parquet"],
        ["evaluate", f"{p}.parquet", "--labels", labels, "--label-map", "challenge2021", "--bootstrap", "0",
         "-o", f"{e}.json"],
        ["probe", str(emb), "--labels", demo, "--folds", "5", "--seed", "1", "-o", f"{p}.demo.parquet"],
        ["evaluate", f"{p}.demo.parquet", "--labels", demo, "--bootstrap", "0", "-o", f"{e}.demo.json"]]
    assert len(calls) == 8 and "--seed" in calls[4] and calls[4][calls[4].index("--seed") + 1] == "2"
    assert "| enc (3 fold seeds) | 0.667 [0.500, 0.750] |" in table, table

    assert run("fold_noise.sh", out, "enc", FOLD_SEEDS="1 2")[0] == []
    assert len(run("fold_noise.sh", out, "enc", FOLD_SEEDS="1 2", FORCE="1")[0]) == 8
    age(*(out / "eval").glob("enc-folds*"), seconds=50)
    age(emb, seconds=10)  # new embeddings: every seed again
    assert len(run("fold_noise.sh", out, "enc", FOLD_SEEDS="1 2")[0]) == 8


def test_aggregation_reruns_only_the_steps_that_are_out_of_date(out: Path) -> None:
    """One probe per encoder and an evaluation per rule the first time; nothing on a rerun; the evaluations alone
    when only the probe is newer; probe and evaluations of the encoder whose embeddings are newer."""
    ckpt = out / "runs" / "ckpt"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_text("")
    (out / "emb").mkdir()
    emb = {enc: out / "emb" / f"seg-{enc}.parquet" for enc in ("recipe", "random")}
    for e in emb.values():
        e.write_text("")
    age(ckpt / "model.safetensors", seconds=200)
    age(*emb.values(), seconds=100)  # newer than the checkpoint: not embedded again
    calls, table = run("aggregation.sh", out, str(ckpt))
    labels = str(out / "data/eval-records/labels-s00000of00001.parquet")
    pred = str(out / "probe" / "seg-recipe.parquet")
    assert calls[:2] == [
        ["probe", str(emb["recipe"]), "--labels", labels, "--label-map", "challenge2021", "--folds", "5", "-o", pred],
        ["evaluate", pred, "--labels", labels, "--label-map", "challenge2021", "--aggregate", "max", "--bootstrap",
         "0", "-o", str(out / "eval" / "seg-recipe-max.json")]]
    assert [c[0] for c in calls] == ["probe", "evaluate", "evaluate", "evaluate"] * 2
    assert table.count("| seg-recipe-mean | 0.750 | 0.750 |") == 2  # segment and record level

    assert run("aggregation.sh", out, str(ckpt)) == ([], table)  # all up to date: no ecgfm command at all
    outputs = [*(out / "probe").glob("*.parquet"), *(out / "eval").glob("*.json")]
    age(*outputs, seconds=50)
    age(out / "probe" / "seg-recipe.parquet", seconds=20)  # a new probe: its evaluations again
    age(emb["random"], seconds=20)  # new embeddings: probe and evaluations again
    calls, _ = run("aggregation.sh", out, str(ckpt))
    assert [(c[0], Path(c[c.index("-o") + 1]).name) for c in calls] == [
        ("evaluate", "seg-recipe-max.json"), ("evaluate", "seg-recipe-mean.json"), ("evaluate", "seg-recipe-min.json"),
        ("probe", "seg-random.parquet"), ("evaluate", "seg-random-max.json"), ("evaluate", "seg-random-mean.json"),
        ("evaluate", "seg-random-min.json")]
    assert len(run("aggregation.sh", out, str(ckpt), FORCE="1")[0]) == 8
