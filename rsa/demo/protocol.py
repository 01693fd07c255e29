"""The demo's protocol (the paper's, after SACPO): which models are made, with which settings.

Per seed, on the same data, steps, batch size, learning rate and seed:
  sft                 the SFT model, no alignment
  dpo (H)             helpfulness step, objective dpo                  (SACPO's first step)
  ra-dpo (H)          helpfulness step, objective rsa2 with the risk   (RSA's first step)
  sacpo (H->S) G      dpo (H), then a safety step with objective dpo at beta / lambda = G
  rsa (H->S) G        ra-dpo (H), then a safety step with objective rsa2 at beta / lambda = G
  rsa (DPO->S) G      dpo (H), then the rsa2 safety step at G: the ablation that isolates RSA's
                      safety step (the same start, reference and data as sacpo (H->S) G)
  rsa (H->S) G lr×K   RSA's stronger step (issue 32): G at K times the learning rate; the same
  rsa (DPO->S) G lr×K for the ablation
  sacpo (P) W         (1 - W) dpo (H) + W sacpo (H->S) at SACPO's smallest G   (rsa merge)
  rsa (P) W           (1 - W) ra-dpo (H) + W rsa (H->S) G lr×K, RSA's strongest step

Each safety step starts from the helpfulness model named above, which is also its reference.
G runs over a grid common to both methods and one more point per method (issue 32): a larger
one for SACPO, a smaller one for RSA (its H->S and DPO->S steps alike), and RSA's stronger step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import sft, task


@dataclass
class Settings:
    # 10: enough for a t interval over seeds to decide (docs/demo.md, issue 19); the seeds run
    # in parallel worker processes, one per core.
    seeds: int = 10
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
    # Issue 32: one more point per method, beyond the common grid in the direction that moves
    # its KL to the SFT model towards the other method's: SACPO's safety step at a larger
    # beta / lambda (less drift), RSA's (H->S and DPO->S alike) at a smaller one (more drift).
    # Chosen from measured KL ranges before the comparison was run (docs/demo.md, issue 32).
    sacpo_extra: tuple = (1.0,)
    rsa_extra: tuple = (0.01,)
    # Issue 32, second part: RSA's safety step at (beta / lambda, learning-rate multiple), for its
    # H->S and DPO->S families: the only measured step that moves RSA as far from the SFT model
    # as SACPO's start in the seeds the frontiers missed (docs/demo.md). () leaves it out.
    rsa_strong: tuple = (0.05, 3.0)
    # P: each method's helpfulness model merged with its own strongest safety step (merge_from),
    # the same rule for both methods.
    merge_weights: tuple = (0.25, 0.5, 0.75)
    rsa_risk: str = "cvar:0.9"
    rsa_alpha: float = 0.5
    eval_per_prompt: int = 512
    extra: dict = field(default_factory=dict)   # more trainer settings for every stage

    def __post_init__(self):
        self.safety_grid = tuple(float(g) for g in self.safety_grid)
        self.sacpo_extra = tuple(float(g) for g in self.sacpo_extra)
        self.rsa_extra = tuple(float(g) for g in self.rsa_extra)
        self.merge_weights = tuple(float(w) for w in self.merge_weights)
        self.rsa_strong = tuple(float(v) for v in self.rsa_strong or ())
        for name, v in (("seeds", self.seeds), ("sft_steps", self.sft_steps), ("max_steps", self.max_steps),
                        ("eval_per_prompt", self.eval_per_prompt), ("pairs_per_prompt", self.pairs_per_prompt)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not self.safety_grid or any(not g > 0 for g in self.safety_grid) or len(set(self.safety_grid)) < len(self.safety_grid):
            raise ValueError(f"safety_grid must be distinct positive beta / lambda values, got {self.safety_grid}")
        for name in ("sacpo_extra", "rsa_extra"):
            extra = getattr(self, name)
            if any(not g > 0 for g in extra) or len(set(extra + self.safety_grid)) < len(extra + self.safety_grid):
                raise ValueError(f"{name} must be positive beta / lambda values not in safety_grid, got {extra}")
        if self.rsa_strong and (len(self.rsa_strong) != 2 or not self.rsa_strong[0] > 0
                                or not self.rsa_strong[1] > 0 or self.rsa_strong[1] == 1):
            raise ValueError("rsa_strong must be () or (beta / lambda > 0, learning-rate multiple > 0 and != 1), "
                             f"got {self.rsa_strong}")
        if not self.merge_weights or any(not 0 < w < 1 for w in self.merge_weights):
            raise ValueError(f"merge_weights must be weights in (0, 1), got {self.merge_weights}")

    @classmethod
    def quick(cls, **kw):
        """Fewer steps, samples and frontier points (two per family): what the tests run."""
        base = dict(seeds=1, sft_steps=150, pairs_per_prompt=48, max_steps=30, eval_per_prompt=128,
                    safety_grid=(0.5, 0.05), sacpo_extra=(1.0,), rsa_extra=(0.01,), merge_weights=(0.25, 0.75))
        return cls(**{**base, **kw})

    def safety_steps(self, method: str) -> list[tuple[float, float]]:
        """(beta / lambda, learning-rate multiple) of every safety step of a method: its grid at
        the protocol's learning rate, then (RSA) the stronger step."""
        steps = [(g, 1.0) for g in self.grid(method)]
        return steps + ([self.rsa_strong] if method == "rsa" and self.rsa_strong else [])

    def merge_from(self, method: str) -> tuple[float, float]:
        """(beta / lambda, learning-rate multiple) of the safety model a method's helpfulness model
        is merged with: its strongest safety step, RSA's stronger step where there is one, else
        the smallest beta / lambda of its grid."""
        if method == "rsa" and self.rsa_strong:
            return self.rsa_strong
        return min(self.grid(method)), 1.0

    def grid(self, method: str) -> tuple:
        """The safety step's beta / lambda values of a method ("sacpo" or "rsa", whose H->S and
        DPO->S families share it): the common grid and the method's extra points, descending."""
        extra = {"sacpo": self.sacpo_extra, "rsa": self.rsa_extra}[method]
        return tuple(sorted(self.safety_grid + extra, reverse=True))


# ---------------------------------------------------------------------------- the models


@dataclass(frozen=True)
class Model:
    key: str                 # unique and folder-safe: names the evaluation cache
    label: str               # what the table and the plots call it
    method: str              # sft, dpo, ra-dpo, sacpo or rsa
    family: str | None       # "H", "H->S", "DPO->S", "P" (None for sft)
    setting: float | None    # beta / lambda (H->S) or merge weight (P)
    path: str                # the model folder, relative to the seed folder
    lr_scale: float = 1.0    # the learning rate's multiple of a safety step (issue 32's stronger step)


HELPFUL = {"sacpo": ("dpo", "dpo"), "rsa": ("ra-dpo", "rsa2")}   # method -> (its H model's name, objective)
ABLATION = "rsa-dpo"          # the folder (and YAML) of the rsa2 safety steps from dpo (H)
# family -> ((method, family) of RSA's curve, (method, family) of SACPO's curve it is compared with)
COMPARISONS = {"H->S": (("rsa", "H->S"), ("sacpo", "H->S")),
               "P": (("rsa", "P"), ("sacpo", "P")),
               "DPO->S": (("rsa", "DPO->S"), ("sacpo", "H->S"))}


def lr_tag(lr_scale: float, sep: str = "-lr", times: str = "x") -> str:
    """How names mark a step at another learning rate ("" at the protocol's own)."""
    return "" if lr_scale == 1 else f"{sep}{lr_scale:g}{times}"


def safe_stage(g: float, lr_scale: float = 1.0) -> str:
    return f"safe-{g:g}" + lr_tag(lr_scale)


def model_key(method: str, family: str | None = None, setting: float | None = None, lr_scale: float = 1.0) -> str:
    tag = {None: None, "H": "H", "H->S": "HS", "DPO->S": "DS", "P": "P"}[family]
    return "-".join([method] + ([tag] if tag else []) + ([f"{setting:g}"] if setting is not None else [])) \
        + lr_tag(lr_scale)


def step_label(method: str, family: str, g: float, lr_scale: float = 1.0) -> str:
    return f"{method} ({family}) {g:g}" + lr_tag(lr_scale, " lr×", "")


def models(s: Settings) -> list[Model]:
    out = [Model("sft", "sft", "sft", None, None, "sft")]
    out += [Model(model_key(h, "H"), f"{h} (H)", h, "H", None, f"{m}/helpful") for m, (h, _) in HELPFUL.items()]
    for m in HELPFUL:
        out += [Model(model_key(m, "H->S", g, k), step_label(m, "H->S", g, k), m, "H->S", g, f"{m}/{safe_stage(g, k)}", k)
                for g, k in s.safety_steps(m)]
    out += [Model(model_key("rsa", "DPO->S", g, k), step_label("rsa", "DPO->S", g, k), "rsa", "DPO->S", g,
                  f"{ABLATION}/{safe_stage(g, k)}", k) for g, k in s.safety_steps("rsa")]
    for m in HELPFUL:
        out += [Model(model_key(m, "P", w), f"{m} (P) {w:g}", m, "P", w, f"merge/{m}-{w:g}")
                for w in s.merge_weights]
    return out


def frontier_ends(s: Settings) -> dict[tuple[str, str], list[str]]:
    """(method, family) -> keys of the models each curve compared at matched KL also runs through (issue 32):
    a safety step at beta / lambda -> infinity leaves its start unchanged, so an H->S curve
    starts at its helpfulness model; a merge at W = 0 is its helpfulness model and at W = 1 its
    safety model, so a P curve runs from one to the other. These models are evaluated anyway.
    DPO->S has none: its start is dpo (H), already on SACPO's H->S curve it is compared with,
    and on both curves it would make them meet by identity, not by measurement."""
    return {("sacpo", "H->S"): [model_key("dpo", "H")], ("rsa", "H->S"): [model_key("ra-dpo", "H")],
            ("sacpo", "P"): [model_key("dpo", "H"), model_key("sacpo", "H->S", *s.merge_from("sacpo"))],
            ("rsa", "P"): [model_key("ra-dpo", "H"), model_key("rsa", "H->S", *s.merge_from("rsa"))]}


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


def safety_stage(s: Settings, g: float, lr_scale: float, reference: str) -> dict:
    """One safety stage's config at beta / lambda g and lr_scale times the learning rate."""
    stage = {"name": safe_stage(g, lr_scale), "data": {"path": "data/safe.jsonl", "preference": "safe"},
             # the stage's beta is beta / lambda; rounded so that beta / lambda is g exactly
             "lambda": round(s.beta / g, 12), "reference": reference}
    if lr_scale != 1:
        stage["learning_rate"] = s.learning_rate * lr_scale
    return stage


def run_config(s: Settings, seed: int, objective: str, name: str) -> dict:
    """The `rsa train` config of one method: the helpfulness stage, then one safety stage per
    beta / lambda, each starting from the helpfulness model, which is also its reference. Paths
    are relative to the seed folder, where the YAML file is written."""
    safety = [safety_stage(s, g, k, "helpful") for g, k in s.safety_steps(name)]
    return {
        "model": "sft", "output_dir": name, "defaults": stage_defaults(s, seed, objective),
        "stages": [{"name": "helpful", "data": {"path": "data/helpful.jsonl", "preference": "helpful"}}, *safety],
    }


def ablation_config(s: Settings, seed: int) -> dict:
    """The `rsa train` config of the ablation: every RSA safety step (Settings.safety_steps),
    each started from and referenced to SACPO's helpfulness model (dpo (H)), on the same safety
    data and seed as SACPO's safety steps."""
    stages = [safety_stage(s, g, k, "model") for g, k in s.safety_steps("rsa")]
    # "./": the folder SACPO's run will write, not the hub id sacpo/helpful (rsa/hub.py).
    return {"model": "./sacpo/helpful", "output_dir": ABLATION, "defaults": stage_defaults(s, seed, "rsa2"),
            "stages": stages}
