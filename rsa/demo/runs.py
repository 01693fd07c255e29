"""The demo's pipeline: per seed, SFT -> preference files -> both methods' stages and the
ablation's (rsa train) -> the merges (rsa merge) -> every model evaluated and probed; then the
frontiers, their comparison, the mechanism probe, report.json and the plots. The models and
settings are defined in protocol.py.

Seeds are independent, so they run in parallel worker processes (one torch thread each, as
many as there are cores); a seed's results do not depend on which process ran it.

Nothing is lost on interruption: the SFT model and the data are written to a temporary
folder renamed when complete, the trainer skips finished stages, a merge is finished when
its merge.json (written last) exists, and every evaluation is cached per model (keyed by
the hash of its weights), so a killed demo started again continues where it stopped. Workers
exit when the main process dies, so a killed run leaves nothing behind writing to the folder.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import data, evaluate, frontier, isa, probe, report, sft
from . import workers as workers_
from .protocol import (ABLATION, HELPFUL, Model, Settings, ablation_config, frontier_ends,  # noqa: F401
                       legacy_methods, model_key, models, run_config, safe_stage)


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


def eval_units(s: Settings) -> int:
    """Progress units of one model's evaluation and probe."""
    return max(1, s.eval_per_prompt // 6)


class Progress:
    """One bar over the whole run, in work units of roughly 50 ms of one quiet core each
    (a training step is one unit; the weights below were measured on this machine)."""
    DATA, MERGE = 20, 2

    def __init__(self, s: Settings, enabled: bool, workers: int = 1):
        # two helpfulness steps; SACPO's safety steps, RSA's H->S and DPO->S safety steps
        stages = 2 + len(s.safety_steps("sacpo")) + 2 * len(s.safety_steps("rsa"))
        per_seed = (s.sft_steps + self.DATA + stages * s.max_steps
                    + 2 * len(s.merge_weights) * self.MERGE + len(models(s)) * eval_units(s))
        self.prefix = "rsa demo" + (f" ({workers} workers)" if workers > 1 else "")
        self.bar = tqdm(total=s.seeds * per_seed, desc=self.prefix, disable=not enabled, unit="u", mininterval=0.5,
                        bar_format="{l_bar}{bar}| {percentage:3.0f}% [{elapsed}<{remaining}]{postfix}")

    def doing(self, what: str):
        self.bar.set_description(f"{self.prefix}: {what}", refresh=False)
        self.bar.set_postfix_str("")

    def advance(self, units: int):
        self.bar.update(units)

    def postfix(self, **kw):
        self.bar.set_postfix(**kw)

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
                progress.postfix(loss=f"{logs['loss']:.3f}", acc=f"{logs.get('rewards/accuracy', 0):.2f}")

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


def stage_configs(s: Settings, seed: int) -> dict[str, dict]:
    """YAML name -> `rsa train` config, in the order they must run: both methods, then the
    ablation (which starts from SACPO's helpfulness model)."""
    cfgs = {method: run_config(s, seed, objective, method) for method, (_, objective) in HELPFUL.items()}
    cfgs[ABLATION] = ablation_config(s, seed)
    return cfgs


def ensure_stages(s: Settings, seed: int, root: Path, progress: Progress):
    """Both methods' helpfulness and safety stages and the ablation's safety stages (the trainer
    skips the finished ones)."""
    from rsa.config import load_config
    from rsa.stepwise import STAGE_FILE, run_stages

    for name, cfg in stage_configs(s, seed).items():
        method = cfg["output_dir"]
        done = sum((root / method / st["name"] / STAGE_FILE).is_file() for st in cfg["stages"])
        progress.advance(done * s.max_steps)
        cfg_path = write_yaml(cfg, root / f"{name}.yaml")
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
                merge_models(root / method / "helpful", root / method / safe_stage(*s.merge_from(method)), w, dest)
            progress.advance(Progress.MERGE)


def cache_paths(root: Path, key: str) -> tuple[Path, Path]:
    return root / "eval" / f"{key}.json", root / "eval" / f"{key}.costs.npy"


def evaluate_model(s: Settings, seed: int, root: Path, m: Model, sft_model, probe_set, progress: Progress) -> dict:
    """The model's summary and probe, from its cache when the cache is of these weights and
    settings. ``probe_set()`` gives the seed's probe.ProbeSet (built on first use)."""
    summary_path, costs_path = cache_paths(root, m.key)
    folder = root / m.path
    key = {"model": m.path, "weights_sha256": weights_hash(folder), "eval_per_prompt": s.eval_per_prompt,
           "eval_seed": 10_000 + seed, "probe_seed": probe.probe_seed(seed)}
    if summary_path.is_file() and costs_path.is_file():
        cached = json.loads(summary_path.read_text())
        if cached.get("key") == key:
            progress.advance(eval_units(s))
            return cached["summary"]
    progress.doing(f"seed {seed} evaluate {m.label}")
    policy = sft_model if m.key == "sft" else sft.load_model(folder)
    # The same sampling seed for every model: differences are the models', not the dice's.
    samples = evaluate.score(policy, sft_model, s.eval_per_prompt, seed=key["eval_seed"])
    summary = evaluate.summarize(samples)
    summary["probe"] = probe.probe_logps(policy, probe_set())
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = costs_path.with_name(costs_path.name + ".partial")
    with open(tmp, "wb") as fh:
        np.save(fh, samples.cost.astype(np.float32))
    os.replace(tmp, costs_path)
    _write_atomic(summary_path, json.dumps({"key": key, "summary": summary}, indent=1) + "\n")  # written last
    progress.advance(eval_units(s))
    return summary


def run_seed(s: Settings, seed: int, out: Path, progress: Progress) -> tuple[list[dict], dict]:
    """One seed end to end: (one row per model: its identity and summary, data stats)."""
    root = Path(out).resolve() / f"seed{seed}"
    root.mkdir(parents=True, exist_ok=True)
    model, sft_loss = ensure_sft(s, seed, root, progress)
    stats = ensure_data(s, seed, root, model, sft_loss, progress)
    ensure_stages(s, seed, root, progress)
    ensure_merges(s, seed, root, progress)
    built = []

    def probe_set():
        if not built:
            built.append(probe.probe_set(model, s.eval_per_prompt, seed))
        return built[0]

    rows = []
    for m in models(s):
        summary = evaluate_model(s, seed, root, m, model, probe_set, progress)
        rows.append({"seed": seed, "key": m.key, "label": m.label, "method": m.method, "family": m.family,
                     "setting": m.setting, "lr_scale": m.lr_scale, **summary})
    return rows, stats


def load_costs(out: Path, seeds: int, key: str) -> np.ndarray:
    """The costs of every sample of one model, all seeds pooled (from the evaluation caches)."""
    return np.concatenate([np.load(cache_paths(Path(out).resolve() / f"seed{k}", key)[1]) for k in range(seeds)])


def training_logs(out: Path, s: Settings, seed: int = 0) -> dict:
    """run -> stage -> logged steps, for training.png."""
    root = Path(out).resolve() / f"seed{seed}"
    stages = {m: [safe_stage(*step) for step in s.safety_steps(m)] for m in HELPFUL}
    logs = {f"{m} ({objective})": {n: stage_log(root / m / n) for n in ["helpful"] + stages[m]}
            for m, (_, objective) in HELPFUL.items()}
    logs["rsa (DPO->S, rsa2)"] = {n: stage_log(root / ABLATION / n) for n in stages["rsa"]}
    return logs


# ---------------------------------------------------------------------------- the whole run


SEED_DIR = re.compile(r"^seed\d+$")


def check_settings(out: Path, s: Settings, fresh: bool, isa_cap: dict | None = None) -> str | None:
    """Keep the earlier run's results only if they were made with these settings and the same
    instruction-set cap (the number of seeds aside: more seeds reuse the first ones); seed
    folders without a settings.json are of unknown make and dropped too. Returns a note when
    results were dropped."""
    path = out / "settings.json"
    current = json.loads(json.dumps({**{k: v for k, v in asdict(s).items() if k != "seeds"}, "isa_cap": isa_cap}))
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


def run_demo(out: Path, s: Settings, progress: bool = True, fresh: bool = False, workers: int | None = None,
             native_isa: bool = False) -> dict:
    """All seeds (in ``workers`` processes; default: one per usable core, at most one per seed),
    then the tables, report.json and the plots. Returns the report dict.

    The seeds run in processes capped at AVX2 (rsa/demo/isa.py: the same digits on every x86-64
    CPU with AVX2) unless ``native_isa`` or the CPU cannot run AVX2 code."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    workers = min(workers or workers_.usable_cores(), s.seeds)
    with workers_.one_thread():
        return _run_demo(Path(out), s, progress, fresh, workers, native_isa)


def _seed_job(job, progress) -> tuple[int, tuple[list[dict], dict], str]:
    s, seed, out = job
    # the kernels this process ran (AVX2 under the cap): recorded in report.json
    return seed, run_seed(s, seed, out, progress), torch.backends.cpu.get_cpu_capability()


def isa_choice(native_isa: bool) -> dict:
    """report.json's "isa": {"cpu": what the CPU offers, "cap": the variables the workers started
    with or null, "why_not": why there is no cap}."""
    cpu = isa.cpu_level()
    if native_isa:
        return {"cpu": cpu, "cap": None, "why_not": "--native-isa"}
    ok, why = isa.can_cap()
    return {"cpu": cpu, "cap": isa.cap_environment() if ok else None, "why_not": None if ok else why}


def _run_demo(out: Path, s: Settings, progress: bool, fresh: bool, workers: int, native_isa: bool) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    start, cpu_start = time.time(), time.process_time()
    children_start = os.times()
    choice = isa_choice(native_isa)
    note = check_settings(out, s, fresh, choice["cap"])
    if note and progress:
        tqdm.write(note)
    if choice["cap"] is None and not native_isa and progress:
        tqdm.write(f"rsa demo: {choice['why_not']}: the seeds run this CPU's own kernels (no AVX2 cap), "
                   "so the digits may differ from the documented run's")
    bar = Progress(s, progress, workers)
    try:
        jobs = [(s, seed, out.resolve()) for seed in range(s.seeds)]
        results, capabilities = {}, set()
        for seed, result, capability in workers_.parallel_map(_seed_job, jobs, workers, bar, env=choice["cap"]):
            results[seed] = result
            capabilities.add(capability)
    finally:
        bar.close()
    rows, data_stats = [], []
    for seed in range(s.seeds):
        seed_rows, stats = results[seed]
        rows += seed_rows
        data_stats.append({"seed": seed, **stats})

    by_key = {}
    for r in rows:
        by_key.setdefault(r["key"], []).append({"seed": r["seed"], **{m: r[m] for m in report.METRICS}})
    methods = report.aggregate({name: by_key[key] for name, key in legacy_methods(s).items()})
    fronts = frontier.frontiers(rows)
    ends = frontier_ends(s)
    matched = frontier.matched(rows, s.seeds, ends)
    mechanism = report.mechanism(rows, s.safety_grid, s.seeds, ends)
    text = report.verdict(matched)

    # tail.png: per compared family, the sacpo and rsa points nearest one reward both frontiers reach
    tail_costs = {"sft": load_costs(out, s.seeds, "sft")}
    for family, chosen in report.tail_picks(fronts).items():
        for point_family, p in chosen:
            key = model_key(p["method"], point_family, p[frontier.KNOB[point_family]], p.get("lr_scale", 1.0))
            tail_costs[report.point_label(point_family, p)] = load_costs(out, s.seeds, key)
    report.plot_tail(out, tail_costs)
    report.plot_training(out, training_logs(out, s))
    models_ = report.models_summary(rows)
    report.plot_frontier(out, fronts, report.anchors(models_))
    children = os.times()
    cpu_s = (time.process_time() - cpu_start + children.children_user - children_start.children_user
             + children.children_system - children_start.children_system)
    extra = {"verdict": text, "settings": asdict(s), "data": data_stats, "workers": workers,
             # PyTorch's CPU kernels round differently per instruction set: say which ones ran
             "cpu_capability": "/".join(sorted(capabilities)), "isa": choice,
             "elapsed_s": round(time.time() - start, 1), "cpu_s": round(cpu_s, 1),
             "models": models_, "frontier": fronts, "matched": matched, "mechanism": mechanism}
    if note:
        extra["note"] = note
    report.write_json(out, methods, extra)
    return {"methods": methods, **extra, "rows": rows}   # rows: for the terminal table, not in report.json
