"""`rsa demo`: the embedded safety task on the paper's protocol: the helpfulness-safety
frontiers of SACPO and RSA (and the ablation DPO->S), compared at matched helpfulness and at
matched KL with 95% intervals over seeds, on the CPU, seeds in parallel processes."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="number of seeds (default 10, or 1 with --quick)")
    parser.add_argument("--workers", type=int, default=None,
                        help="parallel worker processes, one seed each at a time (default: one per usable core)")
    parser.add_argument("--quick", action="store_true",
                        help="one seed, fewer steps, samples and frontier points (about a minute; what the tests run)")
    parser.add_argument("--risk", default=None, help="risk of the rsa runs (default cvar:0.9)")
    parser.add_argument("--fresh", action="store_true",
                        help="start over instead of continuing the run found in --out")
    parser.add_argument("--native-isa", action="store_true",
                        help="run the CPU's own kernels (AVX-512 where it has it) instead of capping PyTorch, MKL "
                             "and oneDNN at AVX2, which gives the documented digits on any x86-64 CPU with AVX2")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    # the plain checks before the imports of torch and the demo (a mistake answers at once)
    if args.seeds is not None and args.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    if getattr(args, "_own_process", False):
        # the demo trains full-weight models on the CPU: no PEFT, bitsandbytes or DeepSpeed, in
        # this process and in its workers (whose Trainer imports would otherwise load them)
        from rsa.optional import OPTIONAL, keep_out
        keep_out(OPTIONAL, children=True)
    from rsa.demo.report import summary_text
    from rsa.demo.runs import Settings, run_demo

    kw = {}
    if args.seeds is not None:
        kw["seeds"] = args.seeds
    if args.risk is not None:
        from rsa_kernels.risk import parse_risk
        kw["rsa_risk"] = str(parse_risk(args.risk, "--risk"))
    settings = Settings.quick(**kw) if args.quick else Settings(**kw)
    result = run_demo(args.out, settings, progress=not args.no_progress, fresh=args.fresh, workers=args.workers,
                      native_isa=args.native_isa)
    print()
    print(summary_text(result))
    print(f"\n{args.out}/report.json, frontier.png, tail.png, training.png written in {result['elapsed_s']:.0f} s "
          f"({result['cpu_s']:.0f} s of CPU)")
    return 0
