"""The one error family: any module raises an :class:`EcgfmError` (or a subclass) for bad input, a bad option or
an unusable artifact; :func:`ecgfm_cli.cli.main` alone turns it into one line, ``ecgfm COMMAND: error: MESSAGE``,
and exit status 2. Messages say what and where, and how to fix it when that is not obvious."""


class EcgfmError(Exception):
    """A bad input, option or artifact: printed as one line, exit status 2, no traceback."""
