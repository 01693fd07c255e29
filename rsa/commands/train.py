"""`rsa train CONFIG.yaml`: run the stages of a stepwise-alignment config (rsa.stepwise)."""
from __future__ import annotations


def add_arguments(parser):
    parser.add_argument("config", help="YAML run config (see docs/trainer.md)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    from rsa.stepwise import run_stages
    for path in run_stages(args.config, progress=not args.no_progress):
        print(path)
    return 0
