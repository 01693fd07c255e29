"""The demo's protocol (the paper's, after SACPO): per seed, SFT -> preference files -> the
helpfulness step of each method -> its safety step at every beta / lambda of a grid, from the
helpfulness model (also the reference) -> weight merges of the helpfulness model with one
safety model -> every model evaluated.

Models per seed (same data, steps, batch size, learning rate and seed for all):
  sft                 the SFT model, no alignment
  dpo (H)             helpfulness step, objective dpo                  (SACPO's first step)
  ra-dpo (H)          helpfulness step, objective rsa2 with the risk   (RSA's first step)
  sacpo (H->S) G      dpo (H), then a safety step with objective dpo at beta / lambda = G
  rsa (H->S) G        ra-dpo (H), then a safety step with objective rsa2 at beta / lambda = G
  sacpo (P) W         (1 - W) dpo (H) + W sacpo (H->S) at the grid's smallest G   (rsa merge)
  rsa (P) W           (1 - W) ra-dpo (H) + W rsa (H->S) at the grid's smallest G

Nothing is lost on interruption: the SFT model and the data are written to a temporary
folder renamed when complete, the trainer skips finished stages, a merge is finished when
its merge.json (written last) exists, and every evaluation is cached per model (keyed by
the hash of its weights), so a killed demo started again continues where it stopped.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import data, evaluate, frontier, report, sft, task


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
    beta: float = 0.5                # the helpfulness step's beta
    # The safety step's beta / lambda. The paper's grid (0.1, 0.05, 0.025, 0.01) is 1, 1/2,
    # 1/4 and 1/10 of its helpfulness beta (0.1); these are the same fractions of this demo's
    # helpfulness beta (0.5). Fixed before any frontier was computed (docs/demo.md).
    safety_grid: tuple = (0.5, 0.25, 0.125, 0.05)
    # P: the helpfulness model merged with the safety model at the grid's smallest beta / lambda
    # (the strongest safety step), the same rule for both methods.
    merge_weights: tuple = (0.25, 0.5, 0.75)
    rsa_risk: str = "cvar:0.9"
    rsa_alpha: float = 0.5
    eval_per_prompt: int = 512
    extra: dict = field(default_factory=dict)   # more trainer settings for every stage

    def __post_init__(self):
        self.safety_grid = tuple(float(g) for g in self.safety_grid)
        self.merge_weights = tuple(float(w) for w in self.merge_weights)
        for name, v in (("seeds", self.seeds), ("sft_steps", self.sft_steps), ("max_steps", self.max_steps),
                        ("eval_per_prompt", self.eval_per_prompt), ("pairs_per_prompt", self.pairs_per_prompt)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not self.safety_grid or any(not g > 0 for g in self.safety_grid) or len(set(self.safety_grid)) < len(self.safety_grid):
            raise ValueError(f"safety_grid must be distinct positive beta / lambda values, got {self.safety_grid}")
        if not self.merge_weights or any(not 0 < w < 1 for w in self.merge_weights):
            raise ValueError(f"merge_weights must be weights in (0, 1), got {self.merge_weights}")

    @classmethod
    def quick(cls, **kw):
        """Fewer steps, samples and frontier points (two per family): what the tests run."""
        base = dict(seeds=1, sft_steps=150, pairs_per_prompt=48, max_steps=30, eval_per_prompt=128,
                    safety_grid=(0.5, 0.05), merge_weights=(0.25, 0.75))
        return cls(**{**base, **kw})

    @property
    def merge_from(self) -> float:
        """beta / lambda of the safety model each method's helpfulness model is merged with."""
        return min(self.safety_grid)


# ---------------------------------------------------------------------------- the models


@dataclass(frozen=True)
class Model:
    key: str                 # unique and folder-safe: names the evaluation cache
    label: str               # what the table and the plots call it
    method: str              # sft, dpo, ra-dpo, sacpo or rsa
    family: str | None       # "H", "H->S", "P" (None for sft)
    setting: float | None    # beta / lambda (H->S) or merge weight (P)
    path: str                # the model folder, relative to the seed folder


HELPFUL = {"sacpo": ("dpo", "dpo"), "rsa": ("ra-dpo", "rsa2")}   # method -> (its H model's name, objective)


def safe_stage(g: float) -> str:
    return f"safe-{g:g}"


def model_key(method: str, family: str | None = None, setting: float | None = None) -> str:
    tag = {None: None, "H": "H", "H->S": "HS", "P": "P"}[family]
    return "-".join([method] + ([tag] if tag else []) + ([f"{setting:g}"] if setting is not None else []))


def models(s: Settings) -> list[Model]:
    out = [Model("sft", "sft", "sft", None, None, "sft")]
    out += [Model(model_key(h, "H"), f"{h} (H)", h, "H", None, f"{m}/helpful") for m, (h, _) in HELPFUL.items()]
    for m in HELPFUL:
        out += [Model(model_key(m, "H->S", g), f"{m} (H->S) {g:g}", m, "H->S", g, f"{m}/{safe_stage(g)}")
                for g in s.safety_grid]
    for m in HELPFUL:
        out += [Model(model_key(m, "P", w), f"{m} (P) {w:g}", m, "P", w, f"merge/{m}-{w:g}")
                for w in s.merge_weights]
    return out


def legacy_methods(s: Settings) -> dict[str, str]:
    """report.json's "methods" (today's keys, plus ra-dpo): sacpo and rsa are the H->S models at
    the grid's largest beta / lambda, with the default grid the single operating point of the
    earlier demo (beta 0.5, lambda 1)."""
    g = max(s.safety_grid)
    return {"sft": "sft", "dpo": model_key("dpo", "H"), "ra-dpo": model_key("ra-dpo", "H"),
            "sacpo": model_key("sacpo", "H->S", g), "rsa": model_key("rsa", "H->S", g)}


# ---------------------------------------------------------------------------- configs


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
    """The `rsa train` config of one method: the helpfulness stage, then one safety stage per
    beta / lambda, each starting from the helpfulness model, which is also its reference. Paths
    are relative to the seed folder, where the YAML file is written."""
    safety = [{"name": safe_stage(g), "data": {"path": "data/safe.jsonl", "preference": "safe"},
               # the stage's beta is beta / lambda; rounded so that beta / lambda is g exactly
               "lambda": round(s.beta / g, 12), "reference": "helpful"} for g in s.safety_grid]
    return {
        "model": "sft", "output_dir": name, "defaults": stage_defaults(s, seed, objective),
        "stages": [{"name": "helpful", "data": {"path": "data/helpful.jsonl", "preference": "helpful"}}, *safety],
    }


def write_yaml(cfg: dict, path: Path) -> Path:
    import yaml
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def stage_log(stage_dir: Path) -> list[dict]:
    """The trainer's per-step metrics log of a finished stage (empty if it has none)."""
    from rsa.stepwise import METRICS_FILE

    p = Path(stage_dir) / METRICS_FILE
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------- progress


class Progress:
    """One bar over the whole run, in work units of roughly 50 ms of one quiet core each
    (a training step is one unit; the weights below were measured on this machine)."""
    DATA, MERGE = 20, 2

    def __init__(self, s: Settings, enabled: bool):
        self.eval_units = max(1, s.eval_per_prompt // 6)
        per_seed = (s.sft_steps + self.DATA + (2 + 2 * len(s.safety_grid)) * s.max_steps
                    + 2 * len(s.merge_weights) * self.MERGE + len(models(s)) * self.eval_units)
        self.bar = tqdm(total=s.seeds * per_seed, desc="rsa demo", disable=not enabled, unit="u", mininterval=0.5,
                        bar_format="{l_bar}{bar}| {percentage:3.0f}% [{elapsed}<{remaining}]{postfix}")

    def doing(self, what: str):
        self.bar.set_description(f"rsa demo: {what}", refresh=False)
        self.bar.set_postfix_str("")

    def advance(self, units: int):
        self.bar.update(units)

    def close(self):
        self.bar.close()


def progress_callback(progress: Progress, label: str):
    """A TrainerCallback moving the demo's bar one unit per step, with the loss alongside."""
    from transformers import TrainerCallback

    class StepBar(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            progress.doing(f"{label} {Path(args.output_dir).name}")

        def on_step_end(self, args, state, control, **kw):
            progress.advance(1)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                progress.bar.set_postfix(loss=f"{logs['loss']:.3f}", acc=f"{logs.get('rewards/accuracy', 0):.2f}")

    return StepBar()


# ---------------------------------------------------------------------------- one seed


def _replace_dir(tmp: Path, final: Path):
    """Publish a folder written in full under a temporary name (a kill leaves no half folder)."""
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def _write_atomic(path: Path, text: str):
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def weights_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(folder).glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def ensure_sft(s: Settings, seed: int, root: Path, progress: Progress):
    """The SFT model of this seed, trained unless saved by an earlier run; (model, final loss)."""
    path = root / "sft"
    if (path / "demo_sft.json").is_file():
        progress.advance(s.sft_steps)
        return sft.load_model(path), json.loads((path / "demo_sft.json").read_text())["sft_loss"]
    progress.doing(f"seed {seed} sft")
    model, loss = sft.train_sft(seed, steps=s.sft_steps, progress=False, on_step=lambda: progress.advance(1))
    tmp = root / "sft.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    sft.save_sft(model, tmp)
    (tmp / "demo_sft.json").write_text(json.dumps({"sft_loss": loss}) + "\n")
    _replace_dir(tmp, path)
    return model, loss


def ensure_data(s: Settings, seed: int, root: Path, model, sft_loss: float, progress: Progress) -> dict:
    """The two preference files (independent SFT samples, one per preference) and their stats."""
    path = root / "data"
    if (path / "stats.json").is_file():
        progress.advance(Progress.DATA)
        return json.loads((path / "stats.json").read_text())
    progress.doing(f"seed {seed} preference data")
    tmp = root / "data.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    stats = {"sft_loss": sft_loss}
    for k, pref in enumerate(("helpful", "safe")):
        recs = data.preference_subset(data.sample_records(model, s.pairs_per_prompt, seed * 1000 + k + 1), pref)
        data.write_jsonl(recs, tmp / f"{pref}.jsonl")
        stats[pref] = data.data_stats(recs)
    (tmp / "stats.json").write_text(json.dumps(stats) + "\n")
    _replace_dir(tmp, path)
    progress.advance(Progress.DATA)
    return stats


def ensure_stages(s: Settings, seed: int, root: Path, progress: Progress):
    """Both methods' helpfulness and safety stages (the trainer skips the finished ones)."""
    from rsa.config import load_config
    from rsa.stepwise import STAGE_FILE, run_stages

    for method, (_, objective) in HELPFUL.items():
        cfg = run_config(s, seed, objective, method)
        done = sum((root / method / st["name"] / STAGE_FILE).is_file() for st in cfg["stages"])
        progress.advance(done * s.max_steps)
        cfg_path = write_yaml(cfg, root / f"{method}.yaml")
        # With its own bars off the Trainer prints every logged step to stdout (60 dicts a
        # stage); they are all in the stage's metrics.jsonl, so keep the terminal for the bar.
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            run_stages(load_config(cfg_path), progress=False,
                       callbacks=[progress_callback(progress, f"seed {seed} {method}")])


def ensure_merges(s: Settings, seed: int, root: Path, progress: Progress):
    from rsa.merge import merge_models

    for method in HELPFUL:
        for w in s.merge_weights:
            dest = root / "merge" / f"{method}-{w:g}"
            if not (dest / "merge.json").is_file():   # merge.json is written last
                progress.doing(f"seed {seed} merge {method} {w:g}")
                merge_models(root / method / "helpful", root / method / safe_stage(s.merge_from), w, dest)
            progress.advance(Progress.MERGE)


def cache_paths(root: Path, key: str) -> tuple[Path, Path]:
    return root / "eval" / f"{key}.json", root / "eval" / f"{key}.costs.npy"


def evaluate_model(s: Settings, seed: int, root: Path, m: Model, sft_model, progress: Progress) -> dict:
    """The model's summary, from its cache when the cache is of these weights and settings."""
    summary_path, costs_path = cache_paths(root, m.key)
    folder = root / m.path
    key = {"model": m.path, "weights_sha256": weights_hash(folder), "eval_per_prompt": s.eval_per_prompt,
           "eval_seed": 10_000 + seed}
    if summary_path.is_file() and costs_path.is_file():
        cached = json.loads(summary_path.read_text())
        if cached.get("key") == key:
            progress.advance(progress.eval_units)
            return cached["summary"]
    progress.doing(f"seed {seed} evaluate {m.label}")
    policy = sft_model if m.key == "sft" else sft.load_model(folder)
    # The same sampling seed for every model: differences are the models', not the dice's.
    samples = evaluate.score(policy, sft_model, s.eval_per_prompt, seed=key["eval_seed"])
    summary = evaluate.summarize(samples)
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = costs_path.with_name(costs_path.name + ".partial")
    with open(tmp, "wb") as fh:
        np.save(fh, samples.cost.astype(np.float32))
    os.replace(tmp, costs_path)
    _write_atomic(summary_path, json.dumps({"key": key, "summary": summary}, indent=1) + "\n")  # written last
    progress.advance(progress.eval_units)
    return summary


def run_seed(s: Settings, seed: int, out: Path, progress: Progress) -> tuple[list[dict], dict]:
    """One seed end to end: (one row per model: its identity and summary, data stats)."""
    root = Path(out).resolve() / f"seed{seed}"
    root.mkdir(parents=True, exist_ok=True)
    model, sft_loss = ensure_sft(s, seed, root, progress)
    stats = ensure_data(s, seed, root, model, sft_loss, progress)
    ensure_stages(s, seed, root, progress)
    ensure_merges(s, seed, root, progress)
    rows = []
    for m in models(s):
        summary = evaluate_model(s, seed, root, m, model, progress)
        rows.append({"seed": seed, "key": m.key, "label": m.label, "method": m.method, "family": m.family,
                     "setting": m.setting, **summary})
    return rows, stats


def load_costs(out: Path, seeds: int, key: str) -> np.ndarray:
    """The costs of every sample of one model, all seeds pooled (from the evaluation caches)."""
    return np.concatenate([np.load(cache_paths(Path(out).resolve() / f"seed{k}", key)[1]) for k in range(seeds)])


def training_logs(out: Path, s: Settings, seed: int = 0) -> dict:
    """run -> stage -> logged steps, for training.png."""
    root = Path(out).resolve() / f"seed{seed}"
    names = ["helpful"] + [safe_stage(g) for g in s.safety_grid]
    return {f"{m} ({objective})": {n: stage_log(root / m / n) for n in names}
            for m, (_, objective) in HELPFUL.items()}


# ---------------------------------------------------------------------------- the whole run


SEED_DIR = re.compile(r"^seed\d+$")


def check_settings(out: Path, s: Settings, fresh: bool) -> str | None:
    """Keep the earlier run's results only if they were made with these settings (the number
    of seeds aside: more seeds reuse the first ones); seed folders without a settings.json
    are of unknown make and dropped too. Returns a note when results were dropped."""
    path = out / "settings.json"
    current = json.loads(json.dumps({k: v for k, v in asdict(s).items() if k != "seeds"}))
    earlier = json.loads(path.read_text()) if path.is_file() else None
    note = None
    if fresh or earlier != current:
        dropped = [p for p in out.iterdir() if p.is_dir() and SEED_DIR.match(p.name)]
        for p in dropped:
            shutil.rmtree(p)
        if dropped:
            why = ("--fresh" if fresh else "no settings.json" if earlier is None
                   else "the settings differ from the earlier run's")
            note = f"{why}: the earlier results in {out} were removed and the run starts over"
    _write_atomic(path, json.dumps(current, indent=2) + "\n")
    return note


def run_demo(out: Path, s: Settings, progress: bool = True, fresh: bool = False) -> dict:
    """All seeds, then the tables, report.json and the plots. Returns the report dict."""
    # One thread: the model is tiny, so extra threads only add synchronisation, and on a
    # shared machine oversubscribed threads made every step several times slower.
    from transformers.utils import logging as hf_logging

    threads, hf_bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()   # "Loading weights" bars for every tiny model: noise here
    try:
        return _run_demo(Path(out), s, progress, fresh)
    finally:
        torch.set_num_threads(threads)
        if hf_bars:
            hf_logging.enable_progress_bar()


def _run_demo(out: Path, s: Settings, progress: bool, fresh: bool) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    start, cpu_start = time.time(), time.process_time()
    note = check_settings(out, s, fresh)
    if note and progress:
        tqdm.write(note)
    rows, data_stats = [], []
    bar = Progress(s, progress)
    try:
        for seed in range(s.seeds):
            seed_rows, stats = run_seed(s, seed, out, bar)
            rows += seed_rows
            data_stats.append({"seed": seed, **stats})
    finally:
        bar.close()

    by_key = {}
    for r in rows:
        by_key.setdefault(r["key"], []).append({"seed": r["seed"], **{m: r[m] for m in report.METRICS}})
    methods = report.aggregate({name: by_key[key] for name, key in legacy_methods(s).items()})
    fronts = frontier.frontiers(rows)
    matched = frontier.matched(rows, s.seeds)
    text = report.verdict(matched)

    # tail.png: per family, the sacpo and rsa points nearest one reward both frontiers reach
    tail_costs = {"sft": load_costs(out, s.seeds, "sft")}
    for family, chosen in report.tail_picks(fronts).items():
        for p in chosen:
            key = model_key(p["method"], family, p[frontier.KNOB[family]])
            tail_costs[report.point_label(family, p)] = load_costs(out, s.seeds, key)
    report.plot_tail(out, tail_costs)
    report.plot_training(out, training_logs(out, s))
    anchors = report.aggregate({name: by_key[model_key(*k)] for name, k in
                                (("sft", ("sft",)), ("dpo (H)", ("dpo", "H")), ("ra-dpo (H)", ("ra-dpo", "H")))})
    report.plot_frontier(out, fronts, anchors)
    extra = {"verdict": text, "settings": asdict(s), "data": data_stats,
             "elapsed_s": round(time.time() - start, 1), "cpu_s": round(time.process_time() - cpu_start, 1),
             "frontier": fronts, "matched": matched}
    if note:
        extra["note"] = note
    report.write_json(out, methods, extra)
    return {"methods": methods, **extra, "rows": rows}   # rows: for the terminal table, not in report.json
