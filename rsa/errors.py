"""UserError: a mistake of the person running `rsa` (a bad file, flag or value), not a bug.

It subclasses ValueError, so code that calls the library and catches ValueError keeps
working; the `rsa` command prints it as one line (rsa.cli decides what else counts).
"""
from __future__ import annotations


class UserError(ValueError):
    """A bad input, named in the message; the `rsa` command prints it without a traceback."""
