"""The `oocid` entry point: runs the command and turns whatever ends it into one line on stderr
and a documented exit code (oocid.cli.exits), never a traceback."""

from __future__ import annotations

import os
import sys
import traceback

from typer import Abort

from oocid.cli.app import app
from oocid.cli.exits import fail, handle_sigterm, interrupt_code, interrupted, release_sigterm
from oocid.errors import OocidError

try:  # newer typer carries its own copy of click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - typer on the click package
    from click.exceptions import ClickException  # type: ignore[assignment,unused-ignore]

HELP_WIDTH = 120  # help text width when stdout is no terminal (rich would assume 80)


def main() -> None:
    """Entry point: one-line errors with documented exit codes, no tracebacks."""
    if "COLUMNS" not in os.environ and not sys.stdout.isatty():
        # At rich's 80 columns the options table leaves ~18 for the help text: one word a line
        # in a pipe or a file. COLUMNS set by the user still wins.
        os.environ["COLUMNS"] = str(HELP_WIDTH)
    handle_sigterm()  # SIGTERM ends a command as Ctrl-C does: clean-up, one line, exit 143
    try:
        code = app(standalone_mode=False, prog_name="oocid")  # usage errors: below, one line
    except OocidError as e:
        fail(f"error: {e}", e.exit_code)
    except (KeyboardInterrupt, Abort):
        fail(interrupted(), interrupt_code())
    except ClickException as e:  # a mistyped option, a missing argument, a bad value
        if type(e).__name__ == "NoArgsIsHelpError" or not e.format_message():
            if e.format_message():  # no arguments: the help (with rich, printed already)
                print(e.format_message().rstrip("\n"))
            sys.exit(e.exit_code)
        ctx = getattr(e, "ctx", None)
        where = ctx.command_path if ctx is not None else "oocid"
        fail(f"error: {e.format_message().rstrip('.')} (see `{where} --help`)", e.exit_code)
    except Exception as e:
        if os.environ.get("OOCID_DEBUG"):
            traceback.print_exc()
        fail(f"internal error: {type(e).__name__}: {' '.join(str(e).split())} "
             "(set OOCID_DEBUG=1 for the traceback)", 70)
    if code == 130:  # typer turns Ctrl-C inside a command into exit code 130, without a word
        fail(interrupted(), interrupt_code())
    release_sigterm()
    sys.exit(code if isinstance(code, int) else 0)  # as typer's standalone mode: always exits


if __name__ == "__main__":
    main()
