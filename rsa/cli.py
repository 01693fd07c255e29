"""`rsa` command line: each subcommand lives in its own module, imported only when used.

A subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int | None``.

Errors: a user's mistake prints one line ``rsa COMMAND: error: MESSAGE`` on stderr and exits
with status 2 (argparse's own form); anything else is a bug and keeps its traceback.
``--debug`` shows the traceback of a user error too.
"""
from __future__ import annotations

import argparse
import importlib
import linecache
import sys
from pathlib import Path

SUBCOMMANDS = {
    "train": ("rsa.commands.train", "run the stages of a YAML config (stepwise alignment)"),
    "merge": ("rsa.commands.merge", "write (1-W) A + W B of two saved models (P-SACPO)"),
    "demo": ("rsa.commands.demo", "the embedded safety task: SACPO and RSA frontiers compared at matched helpfulness"),
    "bench": ("rsa.commands.bench", "benchmark the loss kernels against the baselines"),
    "eval": ("rsa.commands.eval", "sample models on prompts and measure the cost tail with your scorers"),
}

USER_ERROR_EXIT = 2
# Packages whose own `raise ValueError(...)` statements are input validation written for users.
OWN_PACKAGES = tuple(str(Path(__file__).resolve().parents[1] / pkg) for pkg in ("rsa", "rsa_kernels"))
# Missing or unreadable paths: the message names the path, whoever opened it.
PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rsa", description="Risk-aware stepwise alignment (RSA).")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
            p.set_defaults(_missing=f"'rsa {name}' is not available in this build ({module} is missing)")
            continue
        mod.add_arguments(p)
        if "--debug" not in p._option_string_actions:   # a subcommand may define its own
            p.add_argument("--debug", action="store_true", help="show the traceback of an error")
        p.set_defaults(_run=mod.run)
    return parser


def user_error_message(err: BaseException) -> str | None:
    """The one-line message if ``err`` is a user's mistake, else None (a bug: show the traceback).

    User errors: rsa.errors.UserError (and its subclasses, e.g. rsa.data.DataError); a ValueError
    raised by a `raise` statement of this project's own code (the validation that names the
    argument, SPEC section 5); a missing or unreadable path. A ValueError from inside torch,
    numpy or Transformers, or from a builtin such as int() in our code, is not one: the
    innermost frame then is not one of our `raise` lines.
    """
    from rsa.errors import UserError

    if isinstance(err, UserError):
        return str(err)
    if isinstance(err, PATH_ERRORS) and err.filename is not None:
        return f"{err.strerror or type(err).__name__}: {err.filename}"
    if isinstance(err, ValueError) and _raised_by_own_code(err):
        return str(err)
    return None


def _raised_by_own_code(err: BaseException) -> bool:
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = str(Path(tb.tb_frame.f_code.co_filename).resolve())
    if not filename.startswith(OWN_PACKAGES):
        return False
    return linecache.getline(tb.tb_frame.f_code.co_filename, tb.tb_lineno).lstrip().startswith("raise")


def main(argv=None) -> int:
    """Run one `rsa` command. ``argv`` None: this process is the `rsa` program (sys.argv), so
    what it may import is decided here for the whole process (rsa.optional); a caller passing
    ``argv`` keeps its process as it is."""
    own_process = argv is None
    if own_process:
        from rsa.optional import no_code_from_the_hub
        no_code_from_the_hub()
    args = build_parser().parse_args(argv)
    args._own_process = own_process
    prog = f"rsa {args.command}"
    if getattr(args, "_missing", None):
        print(f"{prog}: error: {args._missing}", file=sys.stderr)
        return USER_ERROR_EXIT
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        if getattr(args, "debug", False):
            raise
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - sorted into user errors and bugs right here
        message = user_error_message(err)
        if message is None or getattr(args, "debug", False):
            raise
        print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
        return USER_ERROR_EXIT


if __name__ == "__main__":
    sys.exit(main())
