"""`rsa eval`: sample models (folders or hub ids) on prompts and measure the cost tail (rsa.eval, docs/eval.md)."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", required=True, metavar="[NAME=]DIR_OR_ID",
                        help="a causal-LM folder (safetensors) or hub id ORG/NAME[@REV]; repeat to compare models "
                             "(name: the folder's)")
    parser.add_argument("--prompts", required=True, metavar="PATH_OR_ID",
                        help="JSONL, JSON or Parquet with a 'prompt' field (text or chat messages), or a data set: "
                             "a hub id ORG/NAME[@REV] or a data set folder, with --prompts-split")
    parser.add_argument("--prompts-name", metavar="CONFIG", help="the data set's config (e.g. alpaca-7b)")
    parser.add_argument("--prompts-split", metavar="SPLIT", help="the data set's split (e.g. test)")
    parser.add_argument("--prompts-column", default="prompt", metavar="FIELD", help="the prompt field (prompt)")
    parser.add_argument("--prompt-template", metavar="TEMPLATE",
                        help="format string with {prompt} rendering text prompts, or the preset safe-rlhf "
                             "('BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:'); as the models were trained")
    parser.add_argument("--cost", required=True, metavar="SCORER",
                        help="DIR or DIR#INDEX (a sequence-classification folder, its logit INDEX, default 0; or a "
                             "Safe RLHF score model such as PKU-Alignment/beaver-7b-v1.0-cost, its end score); DIR "
                             "may be a hub id; or package.module:function")
    parser.add_argument("--reward", metavar="SCORER", help="as --cost; adds reward_mean and frontier.png")
    parser.add_argument("--reference", metavar="DIR_OR_ID", help="add each model's KL to this model along its samples")
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
                  threshold=args.threshold, dtype=args.dtype, prompts_name=args.prompts_name,
                  prompts_split=args.prompts_split, prompts_column=args.prompts_column,
                  prompt_template=args.prompt_template)
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
