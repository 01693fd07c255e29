"""One GRPO training step, TRL's GRPOTrainer against RSAGRPOTrainer: time and peak memory.

Each contender runs in a fresh Python process (glibc returning large blocks at once, as
`rsa bench --train` runs its contenders) and trains a few steps through Trainer.train():
- trl:        trl.GRPOTrainer, beta > 0 (its k3 term; reference log-probs computed in the step);
- exact:      RSAGRPOTrainer, kl_estimator="exact" (risk "kl");
- cvar:       RSAGRPOTrainer, kl_estimator="exact", risk="cvar:0.9".
Sampling is replaced by fixed random completions of --completion tokens (no EOS) so that
every contender scores the same tokens and the step measures what differs: the rest of the
step is TRL's (reward scoring, advantages, the reference's pass, the loss, the backward,
the optimizer). The model is a randomly initialised Llama of --hidden and --layers with the
full --vocab (default Llama 3's 128256), float32, on the CPU unless CUDA is there.

A step runs from the Trainer's on_step_begin to on_step_end. Time: the median over the steps
after the first (warm-up). Memory, per step: on a CPU the resident set's peak (VmHWM, reset
at the step's start through /proc/self/clear_refs) above the resident set at its start, so
above the model, the reference and (after the first step) the optimizer state; on CUDA the
allocator's peak above what was allocated at the start. The same definitions as
`rsa bench --train` (issue 29). Reported: the median of both over the measured steps.

    python bench/grpo_step.py [--vocab 128256] [--completion 1024] [--steps 6] [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rsa.bench.measure import MALLOC_ENV, memory_status  # the step benchmark's own definitions

CONTENDERS = {"trl": {}, "exact": {"kl_estimator": "exact"}, "cvar": {"kl_estimator": "exact", "risk": "cvar:0.9"}}


def run_one(name: str, args) -> dict:
    """In the child process: build, train args.steps steps, return the per-step figures."""
    import torch
    import tokenizers
    import transformers
    import datasets
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rsa.integrations.trl import RSAGRPOConfig, RSAGRPOTrainer

    cuda = torch.cuda.is_available()
    vocab = {f"t{i}": i for i in range(args.vocab)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t1"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t2", pad_token="t0", unk_token="t1")
    cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                                   num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=args.completion + 64, tie_word_embeddings=False,
                                   eos_token_id=2, pad_token_id=0, bos_token_id=None)
    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp(prefix="grpo_step_"))
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    policy = transformers.LlamaForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))

    def fixed_completions(self, prompt_ids, *a, **k):  # sampling replaced: the same random tokens every time
        g = torch.Generator().manual_seed(7)
        ids = torch.randint(3, args.vocab, (len(prompt_ids), args.completion), generator=g)
        return ids.tolist(), None

    base, config_cls = (GRPOTrainer, GRPOConfig) if name == "trl" else (RSAGRPOTrainer, RSAGRPOConfig)
    trainer_cls = type("Fixed" + base.__name__, (base,), {"_generate_single_turn": fixed_completions})
    config = config_cls(output_dir=str(folder / "out"), use_cpu=not cuda, bf16=False, report_to="none",
                        per_device_train_batch_size=args.batch, num_generations=args.batch,
                        max_completion_length=args.completion, save_strategy="no", logging_steps=1, seed=0,
                        learning_rate=1e-5, beta=0.04, max_steps=args.steps, disable_tqdm=True,
                        **CONTENDERS[name])
    data = datasets.Dataset.from_dict({"prompt": [" ".join(f"t{i}" for i in range(10, 26))] * args.steps})
    steps = []

    class Meter(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                self.base = torch.cuda.memory_allocated()
            else:
                self.base = memory_status()["VmRSS"]
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter() - self.t0
            peak = torch.cuda.max_memory_allocated() if cuda else memory_status()["VmHWM"]
            steps.append({"seconds": t, "peak_bytes": max(0, peak - self.base)})

    reward = lambda completions, **k: [float(c.count("t5")) for c in completions]  # noqa: E731
    trainer = trainer_cls(model=policy, reward_funcs=reward, args=config, train_dataset=data,
                          processing_class=tok, callbacks=[Meter()])
    trainer.train()
    kl = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    return {"steps": steps, "kl": kl, "device": "cuda" if cuda else "cpu", "threads": torch.get_num_threads()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--completion", type=int, default=1024, help="completion tokens")
    ap.add_argument("--batch", type=int, default=2, help="completions per step (one prompt's group)")
    ap.add_argument("--steps", type=int, default=6, help="steps per run, the first a warm-up")
    ap.add_argument("--rounds", type=int, default=2, help="runs of every contender, interleaved")
    ap.add_argument("--contenders", default="trl,exact,cvar")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(run_one(args.child, args)))
        return
    names = args.contenders.split(",")
    for n in names:
        if n not in CONTENDERS:
            ap.error(f"--contenders: unknown contender {n!r}; choose from {', '.join(CONTENDERS)}")
    results = {n: [] for n in names}
    passthrough = [f"--{k}={v}" for k, v in vars(args).items() if k not in ("child", "contenders", "rounds")]
    for r in range(args.rounds):
        for n in names:
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, *passthrough, f"--child={n}"], capture_output=True,
                                  text=True, env={**os.environ, **MALLOC_ENV})
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                sys.exit(f"grpo_step: {n} failed:\n{proc.stderr[-3000:]}")
            results[n].append(json.loads(line[-1][7:]))
            print(f"round {r + 1}/{args.rounds} {n}: {time.perf_counter() - t0:.0f} s", flush=True)
    first = results[names[0]][0]
    print(f"\nGRPO step, V={args.vocab}, {args.batch} completions x {args.completion} tokens, Llama hidden "
          f"{args.hidden} x {args.layers} layers, float32, {first['device']} ({first['threads']} threads); "
          f"median over {args.rounds} x {args.steps - 1} steps after warm-up")
    summary = {}
    for n in names:
        steps = [s for run in results[n] for s in run["steps"][1:]]
        summary[n] = (statistics.median(s["seconds"] for s in steps),
                      statistics.median(s["peak_bytes"] for s in steps) / 2**20)
    t_base, m_base = summary[names[0]]
    for n in names:
        t, m = summary[n]
        print(f"  {n:6s} step {t:7.2f} s ({t / t_base:4.2f}x)   peak above start {m:8.1f} MiB ({m / m_base:4.2f}x)"
              f"   logged kl {results[n][0]['kl'][-1]:.4f}")


if __name__ == "__main__":
    main()
