"""The ``ecgfm`` command: registers one function per subcommand (ecgfm_cli/commands/)."""

from __future__ import annotations

import contextlib
import sys
from typing import Annotated

import typer

from ecgfm_cli.errors import EcgfmError

app = typer.Typer(
    name="ecgfm",
    help="ECG foundation models from the command line: ingest -> segment -> pretrain/finetune/embed -> "
    "probe -> evaluate. Commands pass Parquet/Arrow files; `-` is stdin/stdout.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from ecgfm_cli import __version__

        print(f"ecgfm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """ECG foundation models from the command line."""


def first_sentence(doc: str | None) -> str:
    """A command's one-line summary for the top-level help: the first sentence of its docstring, rewrapped
    (typer would show the whole first paragraph with its hard line breaks)."""
    text = " ".join((doc or "").strip().split("\n\n")[0].split())
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


def _register() -> None:
    import importlib

    # `segment` reads stdin by default, so a bare `ecgfm segment` is a command, not a request for help.
    for name in ("ingest", "segment", "convert", "embed", "pretrain", "finetune", "probe", "evaluate", "explain"):
        module = importlib.import_module(f"ecgfm_cli.commands.{name}")
        command = getattr(module, f"{name}_command")
        app.command(name, no_args_is_help=name != "segment", short_help=first_sentence(command.__doc__))(command)


_register()


def _keep_freed_memory() -> None:
    """Stop glibc from returning every freed signal buffer (> 128 KiB) to the OS: each record's
    arrays would otherwise be mmap'ed and page-faulted anew, a third of ingest/segment's time."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 256 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 512 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _click_exceptions() -> tuple[type[Exception], ...]:
    """Click's usage-error base class: typer >= 0.2x raises its vendored copy (``typer._click``), older typer the
    ``click`` package's."""
    found: list[type[Exception]] = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        with contextlib.suppress(ImportError, AttributeError):
            found.append(__import__(module, fromlist=["ClickException"]).ClickException)
    return tuple(found)


def main() -> None:
    """Entry point: one-line errors with exit status 2 instead of tracebacks."""
    _keep_freed_memory()
    commands = {c.name for c in app.registered_commands}
    prog = "ecgfm " + (sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] in commands else "")
    try:
        rc = app(standalone_mode=False)  # returns typer.Exit's code instead of raising it
    except EcgfmError as e:
        message = str(e)
        sub = prog.split()[-1] + ": "
        if message.startswith(sub):  # library messages name their command; the prefix here already does
            message = message[len(sub):]
        print(f"{prog.strip()}: error: {message}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        print("Aborted.", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:  # typer >= 0.2x turns it into exit code 130 itself (below); older typer raises it
        rc = 130
    except BrokenPipeError:
        sys.exit(141)
    except SystemExit as e:
        if isinstance(e.__context__, BrokenPipeError):  # click turns a closed pipe (`| head`) into exit 1
            sys.exit(141)  # what a shell reports for SIGPIPE, as for any tool cut off by `head`
        raise
    except Exception as e:
        if isinstance(e, _click_exceptions()):  # bad option or value, missing argument, unknown command
            if type(e).__name__ == "NoArgsIsHelpError":  # a bare `ecgfm COMMAND`: its help
                e.show()
            else:  # one line, like every other error
                # typer validates through pydantic, whose ValueError text starts "Value error, "
                message = e.format_message().replace(": Value error, ", ": ")
                print(f"{prog.strip()}: error: {message} (see `{prog.strip()} --help`)", file=sys.stderr)
            sys.exit(e.exit_code)
        raise
    if rc == 130:
        print(interrupted_message(prog.strip()), file=sys.stderr)
    sys.exit(rc if isinstance(rc, int) else 0)


#: how to go on after Ctrl-C, per command
_AFTER_INTERRUPT = {
    "pretrain": "`ecgfm pretrain --resume RUN` continues from the last checkpoint",
    "ingest": "nothing unfinished was kept; rerun the same command (shards already done are skipped)",
    "segment": "nothing unfinished was kept; rerun the same command (shards already done are skipped)",
    "embed": "nothing unfinished was kept; rerun the same command",
    "finetune": "the run folder is unfinished (no predictions.parquet); rerun with --overwrite to replace it",
}


def interrupted_message(prog: str) -> str:
    """The one line printed after Ctrl-C: what was interrupted and how to continue."""
    hint = _AFTER_INTERRUPT.get(prog.split()[-1]) if prog != "ecgfm" else None
    return f"{prog}: interrupted" + (f": {hint}" if hint else "")


if __name__ == "__main__":
    main()
