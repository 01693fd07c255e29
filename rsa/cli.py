"""`rsa` command line: each subcommand lives in its own module, imported only when used.

A subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int | None``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "train": ("rsa.commands.train", "run the stages of a YAML config (stepwise alignment)"),
    "merge": ("rsa.commands.merge", "write (1-W) A + W B of two saved models (P-SACPO)"),
    "demo": ("rsa.commands.demo", "the embedded safety task: SFT, DPO, SACPO and RSA compared"),
    "bench": ("rsa.commands.bench", "benchmark the loss kernels against the baselines"),
}


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
        p.set_defaults(_run=mod.run)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "_missing", None):
        print(args._missing, file=sys.stderr)
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
