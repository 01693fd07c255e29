"""`rsa eval`: sample local models on prompts and measure the cost tail (rsa.eval, docs/eval.md)."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", required=True, metavar="[NAME=]DIR",
                        help="a local causal-LM folder (safetensors); repeat to compare models (name: the folder's)")
    parser.add_argument("--prompts", required=True, metavar="FILE",
                        help="JSONL, JSON or Parquet with a 'prompt' field (text or chat messages)")
    parser.add_argument("--cost", required=True, metavar="SCORER",
                        help="DIR or DIR#INDEX (a sequence-classification folder; its logit INDEX, default 0) "
                             "or package.module:function")
    parser.add_argument("--reward", metavar="SCORER", help="as --cost; adds reward_mean and frontier.png")
    parser.add_argument("--reference", metavar="DIR", help="add each model's KL to this model along its samples")
    parser.add_argument("--samples", type=int, default=4, metavar="K", help="responses per prompt (default 4)")
    parser.add_argument("--max-new-tokens", type=int, default=256, metavar="T", help="response length limit (256)")
    parser.add_argument("--temperature", type=float, default=1.0, metavar="TEMP", help="sampling temperature (default 1.0)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default 1.0: off)")
    parser.add_argument("--batch-size", type=int, default=16, metavar="B", help="responses sampled at once (16)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="sampling and bootstrap seed (default 0)")
    parser.add_argument("--threshold", type=float, metavar="C",
                        help="cost >= C counts as catastrophic (default: no catastrophic rate)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:K (default: cuda if available)")
    parser.add_argument("--dtype", default=None, metavar="bfloat16|float16|float32|auto",
                        help="dtype of every model loaded (default: bfloat16 on CUDA, float32 on CPU; auto: as stored)")
    parser.add_argument("--out", default="out/eval", help="output folder (default: out/eval)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    from rsa.eval.settings import EvalSettings, parse_models

    values = dict(models=parse_models(args.model), prompts=args.prompts, cost=args.cost, reward=args.reward,
                  reference=args.reference, samples=args.samples, max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size, seed=args.seed,
                  threshold=args.threshold, dtype=args.dtype)
    # Checked before torch is imported (seconds): a mistake is reported at once. The default
    # device (CUDA where there is one) is settled after.
    settings = EvalSettings(**values, device=args.device or "cpu")
    if args.device is None:
        import torch
        if torch.cuda.is_available():
            settings = EvalSettings(**values, device="cuda")

    from rsa.eval.report import table
    from rsa.eval.runner import run_eval
    report = run_eval(settings, args.out, progress=not args.no_progress)
    print()
    print(table(report))
    plots = "tail.png, frontier.png" if args.reward else "tail.png"
    print(f"\n{args.out}/: samples.jsonl, report.json, {plots} written")
    return 0
