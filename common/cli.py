"""Turning bad input into one clear line and a non-zero exit."""

import sys


class UserError(Exception):
    """An error caused by the input (data, flags, checkpoint), reported as one line without a traceback."""


def reason(err: BaseException) -> str:
    """An exception as a short cause: the first non-empty line of its text, else its type's name (an EOFError)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _one_line(err: BaseException) -> str:
    # A UserError raised inside a DataLoader worker comes back re-wrapped, its message followed by the
    # worker's traceback; the original message is the last line, after "common.cli.UserError: ".
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(err).__name__
    return last.split("UserError: ", 1)[-1]


def run(main, args) -> None:
    """Call `main(args)`; a UserError ends the process with `error: <message>` on stderr and exit code 2."""
    try:
        main(args)
    except UserError as err:
        print(f"error: {_one_line(err)}", file=sys.stderr, flush=True)
        sys.exit(2)
