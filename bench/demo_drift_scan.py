"""How far candidate steps move the demo's models from the SFT model (issue 32).

Trains candidate helpfulness and safety steps on the SFT models, data and helpfulness models
of a finished `rsa demo` folder and prints each one's KL to the SFT model (and reward), from
64 samples per prompt, under the demo's AVX2 cap. Only drift and helpfulness are measured:
no tail metric, so that a protocol can be chosen from it before any comparison is run
(docs/demo.md, "Issue 32, second part").

    python bench/demo_drift_scan.py out/demo /tmp/drift --seeds 0 1 2 3 4 5 6 7 8 9

One process per call, one torch thread: run two calls on disjoint seeds to use two cores.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from rsa.demo import isa

os.environ.update(isa.cap_environment())   # before torch is imported (rsa/demo/isa.py)

import torch  # noqa: E402

from rsa.config import load_config  # noqa: E402
from rsa.demo import evaluate, sft  # noqa: E402
from rsa.demo.protocol import Settings, stage_defaults  # noqa: E402
from rsa.demo.runs import write_yaml  # noqa: E402
from rsa.merge import merge_models  # noqa: E402
from rsa.stepwise import run_stages  # noqa: E402

SAMPLES = 64   # per prompt: enough for the mean KL, 1/8 of the demo's evaluation
HELPFUL_BETAS = (0.125, 0.25, 1.0, 2.0)


def candidates() -> list[tuple[str, str, str, float | None, dict]]:
    """(name, objective, start: "sft" or the method whose helpfulness model it starts from,
    beta / lambda or None for a helpfulness step, trainer overrides)."""
    out = [(f"{h} (H) beta {b:g}", obj, "sft", None, {"beta": b})
           for h, obj in (("dpo", "dpo"), ("ra-dpo", "rsa2")) for b in HELPFUL_BETAS]
    for g in (0.5, 0.05):
        out += [(f"rsa (H->S) {g:g} alpha {a:g}", "rsa2", "rsa", g, {"alpha": a}) for a in (0.25, 0.1)]
    out.append(("rsa (H->S) 0.05 180 steps", "rsa2", "rsa", 0.05, {"max_steps": 180}))
    for g in (0.5, 0.05):
        out += [(f"sacpo (H->S) {g:g} lr 3e-3", "dpo", "sacpo", g, {"learning_rate": 3e-3}),
                (f"rsa (H->S) {g:g} lr 3e-3", "rsa2", "rsa", g, {"learning_rate": 3e-3}),
                (f"rsa (DPO->S) {g:g} lr 3e-3", "rsa2", "sacpo", g, {"learning_rate": 3e-3})]
    return out


MERGED = ("sacpo (H->S) 0.05 lr 3e-3", "rsa (H->S) 0.05 lr 3e-3")   # P: merged with their helpfulness model


def train(s: Settings, seed: int, demo: Path, root: Path, name: str, objective: str, start: str,
          g: float | None, overrides: dict) -> Path:
    folder = "".join(c if c.isalnum() or c in ".-" else "_" for c in name)
    d = {**stage_defaults(s, seed, objective), **overrides}
    stage = {"name": "step", "data": {"path": "data/safe.jsonl" if g else "data/helpful.jsonl",
                                      "preference": "safe" if g else "helpful"}}
    if g:
        stage.update({"lambda": round(s.beta / g, 12), "reference": "model"})
    model = "sft" if start == "sft" else str(demo / start / "helpful")
    cfg = write_yaml({"model": model, "output_dir": folder, "defaults": d, "stages": [stage]}, root / f"{folder}.yaml")
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        run_stages(load_config(cfg), progress=False)
    return root / folder / "step"


def scan_seed(s: Settings, seed: int, demo: Path, root: Path) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    for name in ("sft", "data"):
        if not (root / name).exists():
            (root / name).symlink_to(demo / name)
    sft_model = sft.load_model(root / "sft")
    found = {}

    def measure(name: str, folder: Path):
        smp = evaluate.score(sft.load_model(folder), sft_model, SAMPLES, seed=10_000 + seed)
        found[name] = {"kl_to_sft": float(smp.kl.mean()), "reward_mean": float(smp.reward.mean())}
        print(f"seed {seed}  {name:34s} KL {found[name]['kl_to_sft']:6.2f}  reward {found[name]['reward_mean']:5.2f}",
              flush=True)

    for method, h in (("sacpo", "dpo"), ("rsa", "ra-dpo")):
        measure(f"{h} (H)", demo / method / "helpful")
    for name, objective, start, g, overrides in candidates():
        folder = train(s, seed, demo, root, name, objective, start, g, overrides)
        measure(name, folder)
        if name in MERGED:
            method = name.split()[0]
            for w in s.merge_weights:
                dest = root / f"merge-{method}-{w:g}"
                if not (dest / "merge.json").is_file():
                    merge_models(demo / method / "helpful", folder, w, dest)
                measure(f"{method} (P) {w:g} with {name}", dest)
    (root / "drift.json").write_text(json.dumps(found, indent=1) + "\n")
    return found


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("demo", type=Path, help="a finished `rsa demo` folder (default settings)")
    ap.add_argument("out", type=Path, help="where the candidate models are written")
    ap.add_argument("--seeds", type=int, nargs="+", required=True)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    for seed in a.seeds:
        demo = a.demo.resolve() / f"seed{seed}"
        if not (demo / "sft" / "demo_sft.json").is_file():
            ap.error(f"seeds: {demo} holds no finished seed")
        scan_seed(Settings(), seed, demo, a.out.resolve() / f"seed{seed}")


if __name__ == "__main__":
    sys.exit(main())
