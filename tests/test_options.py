"""Options declared once: CLI defaults are the dataclasses', shared options are the same everywhere, choices are
checked by typer with one line naming the option."""

from __future__ import annotations

import dataclasses
import inspect
import os
import subprocess
import sys
import typing
from typing import Any

import pytest
from conftest import run_main

from ecgfm_cli.cli import app
from ecgfm_cli.eval_options import EvalConfig, ProbeOptions, csv_numbers
from ecgfm_cli.model.config import PRESETS, RECIPES, PretrainConfig
from ecgfm_cli.train.options import RECIPE_OPTIONS, FinetuneOptions, LaunchOptions, TrainOptions

COMMANDS = {c.name: c.callback for c in app.registered_commands}


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(","))


#: CLI parameter -> (dataclass field, CLI default -> field default) where the name or the form differ.
RENAMED: dict[str, tuple[str, Any]] = {
    "feature_penalty_weight": ("features_pen_weight", lambda v: v),
    "no_cmsc": ("cmsc", lambda v: not v),
    "no_rlm": ("rlm", lambda v: not v),
    "no_w2v": ("w2v", lambda v: not v),
    "bootstrap": ("n_boot", lambda v: v),
    "threshold": ("threshold_method", lambda v: v),
    **{name: (name, _floats) for name in ("adam_betas", "split_fractions", "c_grid", "alpha_grid", "at_specificity",
                                          "at_sensitivity", "age_bands")},
}
#: Options whose ``auto`` the command resolves into the dataclass field (the device it runs on).
RESOLVED = {"device", "dtype"}
#: Per command, the options with no field of their own: the processes, the inputs and outputs, text parsed into
#: other fields.
CLI_ONLY = {
    "pretrain": {"gpus", "procs", "allow_partial", "latent_temp", "max_time"},
    "finetune": {"gpus", "procs", "allow_partial", "targets", "leads", "continuous"},
    "evaluate": {"predictions", "labels", "label_map", "output", "aggregate_rules", "plots", "baseline", "subgroups",
                 "records", "report"},
    "probe": {"embeddings", "labels", "output", "label_map", "baseline", "baseline_output", "continuous",
              "allow_partial"},
}
#: Per command, the dataclasses its options fill, and how many defaults at least the walk compares.
FILLS = {
    "pretrain": ((TrainOptions, PretrainConfig, LaunchOptions), 34),
    "finetune": ((FinetuneOptions,), 14),
    "evaluate": ((EvalConfig,), 11),
    "probe": ((ProbeOptions,), 6),
}


def _field_defaults(*classes: type) -> dict[str, Any]:
    out = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out.setdefault(f.name, f.default)
            elif f.default_factory is dataclasses.MISSING:
                out.setdefault(f.name, dataclasses.MISSING)  # required: segments, output, labels
    return out


@pytest.mark.parametrize("command", sorted(FILLS))
def test_cli_defaults_are_the_dataclass_defaults(command):
    """Every option of pretrain/finetune/evaluate/probe that fills a dataclass field defaults to that field's
    default (or to None when its preset decides, or ``auto`` resolved at run time); an option with no field is named
    in CLI_ONLY."""
    classes, at_least = FILLS[command]
    defaults = _field_defaults(*classes)
    preset_valued = {k.removeprefix("pretrain.") for k in RECIPE_OPTIONS} | {"preset"}
    checked = 0
    for p in inspect.signature(COMMANDS[command]).parameters.values():
        if p.name in CLI_ONLY[command] or p.name == "ctx":  # ctx: typer's Context, not an option
            continue
        field, convert = RENAMED.get(p.name, (p.name, lambda v: v))
        assert field in defaults, f"--{p.name} fills no field of {[c.__name__ for c in classes]}: add it to CLI_ONLY"
        if p.default is inspect.Parameter.empty:
            assert defaults[field] is dataclasses.MISSING, p.name
            continue
        if p.name in RESOLVED:
            assert p.default == "auto", p.name
            continue
        if p.default is None and command == "pretrain" and p.name in preset_valued:
            continue  # the preset's value (train.pretrain.apply_recipe)
        assert convert(p.default) == defaults[field], (p.name, p.default, defaults[field])
        checked += 1
    assert checked >= at_least, checked


def _signature_defaults(fn: Any) -> dict[str, Any]:
    return {p.name: p.default for p in inspect.signature(fn).parameters.values()
            if p.default is not inspect.Parameter.empty}


def test_core_defaults_are_the_dataclass_defaults():
    """The functions behind probe and pretrain's launch default to what the commands do: the dataclasses'."""
    from ecgfm_cli import probe
    from ecgfm_cli.train import distributed

    launch = _signature_defaults(distributed.launch)
    assert {k: launch[k] for k in ("nnodes", "node_rank", "master_addr", "master_port")} == \
        dataclasses.asdict(LaunchOptions())
    fields = dataclasses.asdict(ProbeOptions())
    compared = 0
    for fn in (probe.fit_label, probe.run_probe, probe.run_probe_folds, probe.probe_files):
        for name, default in _signature_defaults(fn).items():
            name = "split_fractions" if name == "fractions" else name
            if name in fields:
                assert default == fields[name], (fn.__name__, name)
                compared += 1
    assert compared == 3 + 3 + 4 + 6


@pytest.mark.parametrize("values", [ProbeOptions.c_grid, ProbeOptions.alpha_grid, EvalConfig.age_bands,
                                    (0.9, 0.95), (1e-5, 0.123456789, 2.5e-7, 1e16, 0.0)])
def test_numbers_shown_as_defaults_read_back_as_the_same_floats(values):
    text = csv_numbers(values)
    assert _floats(text) == tuple(map(float, values)) and " " not in text


def test_numbers_shown_as_defaults_take_the_shorter_form():
    assert csv_numbers(ProbeOptions.c_grid) == "1e-4,1e-3,0.01,0.1,1,10,100"
    assert csv_numbers(EvalConfig.age_bands) == "40,60,80"


def test_help_imports_no_numerical_library():
    """``ecgfm --help`` and every command's ``--help`` load neither torch nor numpy, scikit-learn, pyarrow: the
    defaults they show come from the plain-data option modules."""
    script = """
import sys
from ecgfm_cli.cli import app, main
for argv in [['--help']] + [[c.name, '--help'] for c in app.registered_commands]:
    sys.argv = ['ecgfm', *argv]
    try:
        main()
    except SystemExit as e:
        assert e.code == 0, (argv, e.code)
print(sorted(m for m in ('torch', 'numpy', 'sklearn', 'scipy', 'pyarrow', 'pandas') if m in sys.modules))
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COLUMNS": "120"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]", res.stdout[-500:] + res.stderr


def _options(command: str) -> dict[str, tuple[Any, Any]]:
    """``{parameter: (type, typer.Option info)}`` of a command, from its annotations."""
    hints = typing.get_type_hints(COMMANDS[command], include_extras=True)
    return {name: typing.get_args(hint) for name, hint in hints.items() if typing.get_origin(hint) is typing.Annotated}


def _choices(kind: Any) -> Any:
    """A ``Literal``'s choices (``X | None``: those of ``X``); any other type as it is."""
    if typing.get_origin(kind) is typing.Literal:
        return typing.get_args(kind)
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return _choices(args[0]) if len(args) == 1 else kind


def test_pretrain_fills_two_dataclasses_by_name_without_ambiguity():
    train = {f.name for f in dataclasses.fields(TrainOptions)}
    assert not train & {f.name for f in dataclasses.fields(PretrainConfig)}


def test_preset_values_in_pretrain_help_are_the_recipes():
    helps = {name: info.help for name, (_, info) in _options("pretrain").items()}
    small = RECIPES["small"]
    assert "preset: 5e-5, small 0.001" in helps["lr"] and small["lr"] == 1e-3 and TrainOptions.lr == 5e-5
    assert f"small {small['pretrain']['num_negatives']}" in helps["num_negatives"]
    assert f"preset: {PretrainConfig.latent_vars}, small {small['pretrain']['latent_vars']}" in helps["latent_vars"]
    assert f"preset: {PRESETS['base'].dropout:g}, small {small['dropout']:g}" in helps["dropout"]
    assert "small 2,0.5,run" in helps["latent_temp"] and "preset: 2,0.5,0.999995" in helps["latent_temp"]


#: Options several commands take (by parameter name); --preset's help says what it sizes in each command.
SHARED = ("device", "gpus", "procs", "threads", "unsafe_pickle", "allow_partial", "preset")


def test_shared_options_are_one_declaration():
    """An option several commands take has one type (choices), name, help, bounds and callback everywhere: only
    its help panel may differ."""
    seen: dict[str, dict[str, tuple]] = {}
    for command in COMMANDS:
        for name, (kind, info) in _options(command).items():
            if name in SHARED:
                kind = _choices(kind)
                help = info.help if name != "preset" else None
                seen.setdefault(name, {})[command] = (kind, info.param_decls, help, info.min, info.callback)
    assert set(seen["device"]) == set(seen["gpus"]) == set(seen["procs"]) == {"pretrain", "finetune", "embed"}
    assert set(seen["unsafe_pickle"]) == {"pretrain", "finetune", "embed", "explain", "convert"}
    assert set(seen["threads"]) == {"pretrain", "embed"}
    for option, by_command in seen.items():
        assert len(set(by_command.values())) == 1, (option, by_command)
    assert set(_choices(_options("pretrain")["preset"][0])) == set(PRESETS)


@pytest.mark.parametrize("args", [
    ("embed", "-", "-o", "x.parquet", "--pool", "rows"),
    ("embed", "-", "-o", "x.parquet", "--nan", "zero"),
    ("embed", "-", "-o", "x.parquet", "--dtype", "float16"),
    ("embed", "-", "-o", "x.parquet", "--device", "tpu"),
    ("embed", "-", "-o", "x.parquet", "--preset", "huge"),
    ("embed", "-", "-o", "x.parquet", "--features", "morphology"),
    ("segment", "-", "--nan", "keep"),
    ("segment", "-", "--dtype", "int16"),
    ("pretrain", "s", "-o", "r", "--lr-schedule", "linear"),
    ("pretrain", "s", "-o", "r", "--dtype", "float16"),
    ("pretrain", "s", "-o", "r", "--device", "tpu"),
    ("pretrain", "s", "-o", "r", "--preset", "huge"),
    ("finetune", "s", "-l", "l", "-o", "r", "--pos-weight", "all"),
    ("finetune", "s", "-l", "l", "-o", "r", "--dtype", "float16"),
    ("finetune", "s", "-l", "l", "-o", "r", "--device", "tpu"),
    ("explain", "x", "--record-id", "a", "-o", "a.png", "--saliency", "lime"),
    ("explain", "x", "--record-id", "a", "-o", "a.png", "--attention", "sum"),
    ("evaluate", "p", "-l", "l", "--threshold", "max"),
    ("evaluate", "p", "-l", "l", "--aggregate", "median"),
])
def test_a_bad_choice_is_one_line_naming_the_option_and_the_choices(capsys, args):
    code, err = run_main(capsys, *args)
    option, value = args[-2], args[-1]
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"ecgfm {args[0]}: error: Invalid value for '{option}': "
                                                   f"'{value}' is not one of "), err
