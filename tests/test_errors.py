"""One error family: every error a user must fix is an EcgfmError, and cli.main alone prints it."""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import ecgfm_cli
from ecgfm_cli.errors import EcgfmError

#: Errors that mark one bad record or header: caught where they arise and counted as rejects, never fatal.
PER_RECORD = {"HeaderError", "PreprocessError", "RejectedRecord"}


def _package_exceptions() -> dict[str, type]:
    found = {}
    for mod in pkgutil.walk_packages(ecgfm_cli.__path__, "ecgfm_cli."):
        if mod.name.endswith("__main__"):
            continue
        module = importlib.import_module(mod.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == mod.name:
                found[f"{mod.name}.{name}"] = obj
    return found


def test_every_error_class_is_in_the_family() -> None:
    outside = sorted(q for q, cls in _package_exceptions().items()
                     if not issubclass(cls, EcgfmError) and q.rsplit(".", 1)[1] not in PER_RECORD)
    assert not outside, f"error classes outside the EcgfmError family: {outside}"


def test_only_cli_main_turns_errors_into_exit_status() -> None:
    """No module but cli.py exits with status 2 or prints 'error:' itself: they raise, cli.main prints."""
    root = Path(ecgfm_cli.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "cli.py":
            continue
        text = path.read_text()
        if "sys.exit(2)" in text or "raise SystemExit(2)" in text or "def fail(" in text:
            offenders.append(str(path.relative_to(root)))
    assert not offenders


def _rank_raises_a_label_error() -> None:
    from ecgfm_cli.labels import LabelError

    raise LabelError(f"labels.csv: rank {os.environ['RANK']} found no record_id column")


def test_a_subclass_raised_in_a_rank_stays_one_line() -> None:
    from ecgfm_cli.train.distributed import launch

    with pytest.raises(EcgfmError, match=r"^labels.csv: rank \d found no record_id column$") as e:
        launch(_rank_raises_a_label_error, (), nprocs=2)
    assert "\n" not in str(e.value)


def test_a_core_error_reaches_the_user_as_one_line(tmp_path: Path) -> None:
    """A LabelError from the core (no try/except in the command) is printed by cli.main: one line, status 2."""
    labels = tmp_path / "labels.csv"
    labels.write_text("patient,AF\np1,1\n")
    preds = tmp_path / "preds.csv"
    preds.write_text("record_id,AF\nr1,0.5\n")
    r = subprocess.run([sys.executable, "-m", "ecgfm_cli", "evaluate", str(preds), "--labels", str(labels)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ecgfm evaluate: error: "), r.stderr
    assert "Traceback" not in r.stderr
