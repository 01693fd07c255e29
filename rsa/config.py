"""RSAConfig (the Trainer arguments plus the loss settings) and the YAML run config of `rsa train`.

YAML schema (relative paths are resolved against the YAML file's folder)::

    model: PATH_OR_ID           # local Hugging Face folder of the SFT model (tokenizer alongside),
                                # or a hub id ORG/NAME[@REVISION] (rsa/hub.py)
    output_dir: DIR             # each stage is saved to DIR/STAGE_NAME
    defaults: {RSAConfig fields shared by all stages}   # e.g. prompt_template: safe-rlhf
    stages:
      - name: helpful
        data: {path: FILE | FOLDER | ORG/NAME, preference: helpful | safe (PKU-SafeRLHF) or absent
               (plain pairs), name: CONFIG, split: SPLIT (a data set's) or FRACTION (held out of a
               file), revision: REV, eval_split: SPLIT, eval_path: FILE, max_samples: N}
        lambda: 2.0             # optional: this stage's beta is beta / lambda (SACPO safety step)
        reference: previous     # optional: previous (default) | model | STAGE_NAME | PATH | ORG/NAME
        lora: {r: 16, ...}      # optional (here or in defaults): train a LoRA adapter (rsa.lora_config)
        ...                     # any other RSAConfig field overrides the defaults for this stage
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainingArguments

from rsa_kernels.risk import parse_risk
from rsa_kernels.validation import check_objective_args

from .hub import is_hub_id
from .lora import check_lora, check_lora_chain
from .sharding import deepspeed_comm_on_cpu
from .templates import check_template


@dataclass
class RSAConfig(TrainingArguments):
    """TrainingArguments plus the RSA loss (SPEC sections 1-3) and the data layout."""
    objective: str = field(default="rsa2", metadata={"help": "dpo, rsa1 or rsa2"})
    risk: str = field(default="cvar:0.9", metadata={"help": "kl, erm:MU, cvar:ALPHA or ra_dpo_cvar:C"})
    beta: float = field(default=0.1, metadata={"help": "temperature BETA"})
    alpha: float = field(default=0.5, metadata={"help": "ALPHA2 of rsa2"})
    gamma: float = field(default=1.0, metadata={"help": "risk discount GAMMA in (0, 1]"})
    label_smoothing: float = field(default=0.0, metadata={"help": "EPS in [0, 0.5]"})
    max_length: int = field(default=512, metadata={"help": "prompt + response tokens kept"})
    max_prompt_length: int = field(default=256, metadata={"help": "prompt tokens kept (its end)"})
    loss_backend: str = field(default="auto", metadata={"help": "rsa_kernels backend: auto, torch, cpu, triton"})
    loss_chunk_size: int | None = field(default=None, metadata={"help": "token rows per lm-head chunk"})
    padding_free: bool = field(default=False, metadata={"help": "pack each batch into one row (no padding)"})
    model_dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16 or float16"})
    keep_checkpoints: bool = field(default=False, metadata={"help": "keep checkpoint-N folders after a stage ends"})
    prompt_template: str | None = field(default=None, metadata={
        "help": "format string with {prompt} rendering text prompts, or the preset safe-rlhf (rsa/templates.py)"})
    # Trainer defaults changed for preference pairs: our collator needs every column, and the
    # SPEC metrics are logged every step.
    remove_unused_columns: bool = False
    logging_steps: float = 1
    # The lm head is used by the loss, after the forward: DDP's search for unused parameters
    # would mark it ready too early ("marked ready twice"); every parameter is used anyway.
    ddp_find_unused_parameters: bool | None = False

    def __post_init__(self):
        check_loss_settings(vars(self))
        super().__post_init__()
        deepspeed_comm_on_cpu(self)  # before any model is loaded (rsa/sharding.py)


def check_loss_settings(values: dict):
    """ValueError naming the field for a bad loss setting (before any model is loaded)."""
    parse_risk(values.get("risk", "cvar:0.9"))
    check_objective_args(values.get("objective", "rsa2"), values.get("beta", 0.1), values.get("alpha", 0.5),
                         values.get("gamma", 1.0), values.get("label_smoothing", 0.0))
    max_length, max_prompt = values.get("max_length", 512), values.get("max_prompt_length", 256)
    for name, v in (("max_length", max_length), ("max_prompt_length", max_prompt)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if max_prompt >= max_length:
        raise ValueError(f"max_prompt_length ({max_prompt}) must be smaller than max_length ({max_length}), "
                         "leaving room for the response")
    check_template(values.get("prompt_template"))
    if values.get("model_dtype", "auto") not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"model_dtype must be auto, float32, bfloat16 or float16, got {values['model_dtype']!r}")


CONFIG_FIELDS = {f.name for f in dataclasses.fields(RSAConfig) if f.init}
MANAGED = {"output_dir"}  # set per stage by rsa.stepwise
TOP_KEYS = {"model", "output_dir", "defaults", "stages"}
STAGE_KEYS = {"name", "data", "lambda", "reference", "lora"}
DATA_KEYS = {"path", "preference", "eval_path", "split", "max_samples", "name", "revision", "eval_split",
             "holdout"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def load_config(path_or_dict) -> dict:
    """Read and validate a run config (a YAML path or an already-parsed dict).

    Returns a plain dict: model and output_dir as absolute path strings, defaults (dict), and
    stages, each {name, data: {path, preference, eval_path, split, max_samples}, lambda,
    reference, lora, overrides: {...}}; ``lora`` is the stage's checked LoRA mapping (the
    defaults' ``lora`` updated by the stage's own) or None for a full-weight stage, and
    ``defaults`` no longer holds it. Validating an already validated config returns it unchanged.
    """
    if isinstance(path_or_dict, (str, Path)):
        import yaml
        path = Path(path_or_dict)
        if not path.is_file():
            raise ValueError(f"config: no such file {str(path)!r}")
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
        base, where = path.resolve().parent, str(path)
    elif isinstance(path_or_dict, dict):
        raw, base, where = path_or_dict, Path.cwd(), "config"
    else:
        raise ValueError(f"config must be a YAML path or a dict, got {type(path_or_dict).__name__}")
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: the top level must be a mapping with keys {sorted(TOP_KEYS)}")
    unknown = set(raw) - TOP_KEYS - {"source"}
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; expected {sorted(TOP_KEYS)}")
    for key in ("model", "output_dir", "stages"):
        if key not in raw:
            raise ValueError(f"{where}: missing key {key!r}")

    def resolve(value, name, hub=False):
        """An absolute path; with ``hub``, a hub id ORG/NAME[@REV] that is no local path stays as given."""
        if not isinstance(value, (str, Path)) or not str(value):
            raise ValueError(f"{where}: {name} must be a path{' or a hub id' if hub else ''}, got {value!r}")
        p = Path(value).expanduser()
        local = p if p.is_absolute() else (base / p)
        if hub and not local.exists() and is_hub_id(value):
            return str(value)
        return str(local.resolve())

    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ValueError(f"{where}: defaults must be a mapping of RSAConfig fields")
    defaults = dict(defaults)
    default_lora = check_lora(defaults.pop("lora", None), f"{where}: defaults.lora")
    _check_fields(defaults, f"{where}: defaults")
    stages_raw = raw["stages"]
    if not isinstance(stages_raw, list) or not stages_raw:
        raise ValueError(f"{where}: stages must be a non-empty list")
    stages, names = [], set()
    for i, st in enumerate(stages_raw):
        at = f"{where}: stages[{i}]"
        if not isinstance(st, dict):
            raise ValueError(f"{at} must be a mapping")
        name = st.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name) or name.startswith("checkpoint"):
            raise ValueError(f"{at}.name must be a folder-safe name (letters, digits, _ . -), got {name!r}")
        if name in names:
            raise ValueError(f"{at}.name {name!r} is used twice")
        names.add(name)
        data = st.get("data")
        if isinstance(data, str):
            data = {"path": data}
        if not isinstance(data, dict) or "path" not in data:
            raise ValueError(f"{at}.data must be a path or a mapping with 'path'")
        bad = set(data) - DATA_KEYS
        if bad:
            raise ValueError(f"{at}.data: unknown key(s) {sorted(bad)}; expected {sorted(DATA_KEYS)}")
        if data.get("preference") not in (None, "helpful", "safe"):
            raise ValueError(f"{at}.data.preference must be helpful, safe or absent, got {data['preference']!r}")
        data = _check_data(data, at, resolve(data["path"], f"stages[{i}].data.path", hub=True))
        if data["eval_path"]:
            # A file; a data set's held-out split is eval_split.
            data["eval_path"] = resolve(data["eval_path"], f"stages[{i}].data.eval_path")
        lam = st.get("lambda")
        if lam is not None and (isinstance(lam, bool) or not isinstance(lam, (int, float))
                                or not math.isfinite(lam) or lam <= 0):
            raise ValueError(f"{at}.lambda must be a number > 0, got {lam!r}")
        ref = st.get("reference", "previous")
        if not isinstance(ref, str) or not ref:
            raise ValueError(f"{at}.reference must be previous, model, a stage name or a path, got {ref!r}")
        if ref not in ("previous", "model"):
            ref = ref if ref in names - {name} else resolve(ref, f"stages[{i}].reference", hub=True)
        validated = isinstance(st.get("overrides"), dict)
        overrides = st["overrides"] if validated else {k: v for k, v in st.items() if k not in STAGE_KEYS}
        _check_fields(overrides, at)
        check_loss_settings({**defaults, **overrides})
        if validated or "lora" not in st:   # a validated stage holds its final mapping (None: full weights)
            lora = st.get("lora") if validated else default_lora
            lora = check_lora(lora, f"{at}.lora")
        elif st["lora"] is None:
            lora = None
        else:
            if not isinstance(st["lora"], dict):
                check_lora(st["lora"], f"{at}.lora")   # raises: not a mapping
            lora = check_lora({**(default_lora or {}), **st["lora"]}, f"{at}.lora")
        stages.append({"name": name, "data": data, "lambda": lam, "reference": ref, "lora": lora,
                       "overrides": dict(overrides)})
    check_lora_chain(stages, defaults, where)
    return {"model": resolve(raw["model"], "model", hub=True), "output_dir": resolve(raw["output_dir"], "output_dir"),
            "defaults": dict(defaults), "stages": stages, "source": raw.get("source", where)}


def _check_data(data: dict, at: str, path: str) -> dict:
    """The stage's checked data mapping: split (a data set's split name) and holdout (the fraction
    of a file held out, given as a number under split) kept apart."""
    split, holdout = data.get("split"), data.get("holdout")
    if isinstance(split, (int, float)) and not isinstance(split, bool):
        if holdout is not None:
            raise ValueError(f"{at}.data: a fraction under split and holdout both given; give one")
        split, holdout = None, split
    if holdout is not None and (isinstance(holdout, bool) or not isinstance(holdout, (int, float))
                                or not 0 < holdout < 1):
        raise ValueError(f"{at}.data.split must be a split name or the held-out fraction in (0, 1), got {holdout!r}")
    for key in ("split", "name", "revision", "eval_split"):
        value = split if key == "split" else data.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError(f"{at}.data.{key} must be a non-empty string, got {value!r}")
    if Path(path).is_file() and any(data.get(k) is not None for k in ("name", "revision", "eval_split")) \
            or Path(path).is_file() and split is not None:
        raise ValueError(f"{at}.data: {path!r} is a local file; name, split (a name), revision and eval_split "
                         "apply to a hub data set or a data set folder (a number under split holds out a fraction)")
    n = data.get("max_samples")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"{at}.data.max_samples must be a positive integer, got {n!r}")
    return {"path": path, "name": data.get("name"), "split": split, "revision": data.get("revision"),
            "preference": data.get("preference"), "eval_path": data.get("eval_path") or None,
            "eval_split": data.get("eval_split"), "holdout": holdout, "max_samples": n}


def _check_fields(values: dict, where: str):
    bad = sorted(set(values) - CONFIG_FIELDS)
    if bad:
        raise ValueError(f"{where}: unknown setting(s) {bad}: not RSAConfig/TrainingArguments fields")
    managed = sorted(set(values) & MANAGED)
    if managed:
        raise ValueError(f"{where}: {managed} is set per stage (OUTPUT/STAGE_NAME); set the top-level output_dir")
