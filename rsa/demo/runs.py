"""The demo pipeline: per seed, SFT -> preference files -> the stepwise runs -> evaluation.

Runs (same data, steps, batch size, learning rate, beta and seed):
  sft    the SFT model, no alignment
  dpo    the helpfulness step only, objective dpo
  sacpo  helpfulness then safety step, objective dpo (SACPO)
  rsa    helpfulness then safety step, objective rsa2 with a cvar risk (RSA)

``dpo`` is the first stage of ``sacpo``: the same config up to that point, so it is the
same model, and training it twice would only cost time.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import data, evaluate, report, sft, task


@dataclass
class Settings:
    seeds: int = 3
    sft_steps: int = 200
    pairs_per_prompt: int = 96       # sampled pairs per prompt, per preference file, before ties are dropped
    max_steps: int = 60              # per alignment stage
    batch_size: int = 16             # pairs per step
    # Chosen, before comparing RSA, as the setting of a small sweep (lr 3e-4 / 1e-3, beta
    # 0.1 / 0.5, seed 0) where the risk-neutral baseline SACPO was healthiest: highest reward,
    # lowest catastrophic rate, no collapse. See docs/demo.md for the whole sweep.
    learning_rate: float = 1e-3
    beta: float = 0.5
    safety_lambda: float = 1.0       # the safety step's temperature is beta / lambda
    rsa_risk: str = "cvar:0.9"
    rsa_alpha: float = 0.5
    eval_per_prompt: int = 512
    extra: dict = field(default_factory=dict)   # more trainer settings for every stage

    @classmethod
    def quick(cls, **kw):
        base = dict(seeds=1, sft_steps=150, pairs_per_prompt=48, max_steps=30, eval_per_prompt=128)
        return cls(**{**base, **kw})


def stage_defaults(s: Settings, seed: int, objective: str) -> dict:
    d = {"objective": objective, "beta": s.beta, "learning_rate": s.learning_rate,
         "per_device_train_batch_size": s.batch_size, "max_steps": s.max_steps, "seed": seed,
         "max_length": sft.MAX_LEN, "max_prompt_length": 1 + task.PROMPT_LEN, "logging_steps": 1,
         "lr_scheduler_type": "constant", "warmup_steps": 0, "weight_decay": 0.0,
         "save_strategy": "no", "report_to": "none", "use_cpu": True, "dataloader_num_workers": 0}
    if objective != "dpo":
        d.update(risk=s.rsa_risk, alpha=s.rsa_alpha)
    d.update(s.extra)
    return d


def run_config(s: Settings, seed: int, objective: str, name: str) -> dict:
    """The `rsa train` config of one run; its paths are relative to the seed folder, where
    the YAML file is written (the trainer resolves them against the YAML file's folder)."""
    return {
        "model": "sft", "output_dir": name, "defaults": stage_defaults(s, seed, objective),
        "stages": [
            {"name": "helpful", "data": {"path": "data/helpful.jsonl", "preference": "helpful"}},
            {"name": "safe", "data": {"path": "data/safe.jsonl", "preference": "safe"},
             "lambda": s.safety_lambda},
        ],
    }


def write_yaml(cfg: dict, path: Path) -> Path:
    import yaml
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def stage_bar(label: str, enabled: bool):
    """A TrainerCallback drawing one quiet progress bar per stage (the Trainer's own bar also
    prints every logged step, 60 lines a stage, which would bury the demo's output)."""
    from transformers import TrainerCallback

    class StageBar(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kw):
            self.bar = tqdm(total=state.max_steps, desc=f"{label} {Path(args.output_dir).name}",
                            disable=not enabled, leave=False)

        def on_step_end(self, args, state, control, **kw):
            self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{logs['loss']:.3f}", acc=f"{logs.get('rewards/accuracy', 0):.2f}")

        def on_train_end(self, args, state, control, **kw):
            self.bar.close()

    return StageBar()


def stage_log(stage_dir: Path) -> list[dict]:
    """The trainer's per-step metrics log of a finished stage (empty if it has none)."""
    from rsa.stepwise import METRICS_FILE

    p = Path(stage_dir) / METRICS_FILE
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def run_seed(s: Settings, seed: int, out: Path, progress: bool = True) -> tuple[dict, dict, dict, dict]:
    """One seed end to end: (summaries per method, costs per method, data stats, training logs)."""
    from rsa.config import load_config
    from rsa.stepwise import run_stages

    root = Path(out).resolve() / f"seed{seed}"
    # The trainer skips stages it finds finished; a demo rerun must not reuse old results.
    for sub in ("sft", "data", "sacpo", "rsa"):
        shutil.rmtree(root / sub, ignore_errors=True)
    model, sft_loss = sft.train_sft(seed, steps=s.sft_steps, progress=progress)
    sft_dir = sft.save_sft(model, root / "sft")

    # Two independent samples, one per preference: the helpfulness and safety data sets.
    stats = {"sft_loss": sft_loss}
    for k, pref in enumerate(("helpful", "safe")):
        recs = data.preference_subset(data.sample_records(model, s.pairs_per_prompt, seed * 1000 + k + 1), pref)
        data.write_jsonl(recs, root / "data" / f"{pref}.jsonl")
        stats[pref] = data.data_stats(recs)

    stage_dirs = {}
    for name, objective in (("sacpo", "dpo"), ("rsa", "rsa2")):
        cfg_path = write_yaml(run_config(s, seed, objective, name), root / f"{name}.yaml")
        # With its own bars off the Trainer prints every logged step to stdout (60 dicts a
        # stage); they are all in the stage's metrics.jsonl, so keep the terminal for the bars.
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            dirs = run_stages(load_config(cfg_path), progress=False,
                              callbacks=[stage_bar(f"seed {seed} {name}", progress)])
        stage_dirs[name] = [Path(d) for d in dirs]

    models = {"sft": sft_dir, "dpo": stage_dirs["sacpo"][0], "sacpo": stage_dirs["sacpo"][1],
              "rsa": stage_dirs["rsa"][1]}
    summaries, costs = {}, {}
    for name, path in tqdm(models.items(), desc=f"evaluate seed {seed}", disable=not progress, leave=False):
        policy = model if name == "sft" else sft.load_model(path)
        # The same sampling seed for every method: differences are the models', not the dice's.
        samples = evaluate.score(policy, model, s.eval_per_prompt, seed=10_000 + seed)
        summaries[name] = {"seed": seed, **evaluate.summarize(samples)}
        costs[name] = samples.cost
    logs = {"dpo / sacpo": {d.name: stage_log(d) for d in stage_dirs["sacpo"]},
            "rsa": {d.name: stage_log(d) for d in stage_dirs["rsa"]}}
    return summaries, costs, stats, logs


def run_demo(out: Path, s: Settings, progress: bool = True) -> dict:
    """All seeds, then the table, report.json and the two plots. Returns the report dict."""
    # One thread: the model is tiny, so extra threads only add synchronisation, and on a
    # shared machine oversubscribed threads made every step several times slower.
    from transformers.utils import logging as hf_logging

    threads, hf_bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()   # "Loading weights" bars for every tiny model: noise here
    try:
        return _run_demo(Path(out), s, progress)
    finally:
        torch.set_num_threads(threads)
        if hf_bars:
            hf_logging.enable_progress_bar()


def _run_demo(out: Path, s: Settings, progress: bool) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    per_seed = {m: [] for m in report.METHODS}
    costs = {m: [] for m in report.METHODS}
    data_stats, first_logs = [], None
    for seed in tqdm(range(s.seeds), desc="rsa demo: seeds", disable=not progress):
        summaries, c, stats, logs = run_seed(s, seed, out, progress)
        for m in report.METHODS:
            per_seed[m].append(summaries[m])
            costs[m].append(c[m])
        data_stats.append({"seed": seed, **stats})
        first_logs = first_logs or logs
    methods = report.aggregate(per_seed)
    pooled = {m: np.concatenate(v) for m, v in costs.items()}
    report.plot_tail(out, pooled)
    report.plot_training(out, first_logs or {})
    text = report.verdict(methods)
    extra = {"verdict": text, "settings": asdict(s), "data": data_stats, "elapsed_s": round(time.time() - start, 1)}
    report.write_json(out, methods, extra)
    return {"methods": methods, **extra}
