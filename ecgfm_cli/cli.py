"""The ``ecgfm`` command: registers one function per subcommand (ecgfm_cli/commands/)."""

from __future__ import annotations

import contextlib
import sys

import typer

from ecgfm_cli.console import UsageError

app = typer.Typer(
    name="ecgfm",
    help="ECG foundation models from the command line: ingest -> segment -> pretrain/finetune/embed -> "
    "probe -> evaluate. Commands pass Parquet/Arrow files; `-` is stdin/stdout.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _register() -> None:
    from ecgfm_cli.commands import ingest, segment

    app.command("ingest", no_args_is_help=True)(ingest.ingest_command)
    app.command("segment")(segment.segment_command)
    for name in ("convert", "embed", "pretrain", "finetune", "probe", "evaluate"):
        try:
            module = __import__(f"ecgfm_cli.commands.{name}", fromlist=["x"])
        except ModuleNotFoundError as e:
            if e.name != f"ecgfm_cli.commands.{name}":
                raise
            continue
        app.command(name, no_args_is_help=True)(getattr(module, f"{name}_command"))


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
    except UsageError as e:
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
    except KeyboardInterrupt:
        hint = "; `--resume` continues from the last checkpoint" if prog.strip() == "ecgfm pretrain" else ""
        print(f"{prog.strip()}: interrupted{hint}", file=sys.stderr)
        sys.exit(130)
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
                print(f"{prog.strip()}: error: {e.format_message()} (see `{prog.strip()} --help`)", file=sys.stderr)
            sys.exit(e.exit_code)
        raise
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
