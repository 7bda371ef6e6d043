"""Options declared once: CLI defaults are the dataclasses', shared options are the same everywhere, choices are
checked by typer with one line naming the option."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any

import pytest
from conftest import run_main

from ecgfm_cli.cli import app
from ecgfm_cli.model.config import PRESETS, RECIPES, PretrainConfig
from ecgfm_cli.train.options import RECIPE_OPTIONS, FinetuneOptions, TrainOptions

COMMANDS = {c.name: c.callback for c in app.registered_commands}

#: CLI parameter -> (dataclass field, CLI default -> field default) where the name or the form differ.
RENAMED: dict[str, tuple[str, Any]] = {
    "feature_penalty_weight": ("features_pen_weight", lambda v: v),
    "no_cmsc": ("cmsc", lambda v: not v),
    "no_rlm": ("rlm", lambda v: not v),
    "no_w2v": ("w2v", lambda v: not v),
    "adam_betas": ("adam_betas", lambda v: tuple(float(x) for x in v.split(","))),
    "split_fractions": ("split_fractions", lambda v: tuple(float(x) for x in v.split(","))),
}
#: Options whose ``auto`` the command resolves into the dataclass field (the device it runs on).
RESOLVED = {"device", "dtype"}
#: Options with no field of their own: the launch, the reading of inputs, text parsed into other fields.
CLI_ONLY = {"gpus", "procs", "nnodes", "node_rank", "master_addr", "master_port", "allow_partial", "latent_temp",
            "max_time", "targets", "leads", "continuous"}


def _field_defaults(*classes: type) -> dict[str, Any]:
    out = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out.setdefault(f.name, f.default)
            elif f.default_factory is dataclasses.MISSING:
                out.setdefault(f.name, dataclasses.MISSING)  # required: segments, output, labels
    return out


@pytest.mark.parametrize(("command", "classes"), [("pretrain", (TrainOptions, PretrainConfig)),
                                                  ("finetune", (FinetuneOptions,))])
def test_cli_defaults_are_the_dataclass_defaults(command, classes):
    """Every option of pretrain/finetune that fills a dataclass field defaults to that field's default (or to
    None when its preset decides, or ``auto`` resolved at run time); an option with no field is named here."""
    defaults = _field_defaults(*classes)
    preset_valued = {k.removeprefix("pretrain.") for k in RECIPE_OPTIONS} | {"preset"}
    checked = 0
    for p in inspect.signature(COMMANDS[command]).parameters.values():
        if p.name in CLI_ONLY:
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
    assert checked > (30 if command == "pretrain" else 10)


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
