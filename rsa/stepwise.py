"""Stepwise alignment (SPEC section 4): run a config's stages in order, each from the previous.

Stage k's reference (and its starting point) is stage k-1's result (the SFT model for the
first stage, unless the stage names another `reference`). Its model is saved to
OUTPUT/STAGE_NAME (safetensors + tokenizer; a LoRA stage: its adapter, rsa/lora.py), with
stage.json (written last: its presence marks the stage finished) and metrics.jsonl (one JSON
object per logged step).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from transformers import TrainerCallback, set_seed

from .config import RSAConfig, load_config
from .data import PairDataset, load_pairs, split_pairs
from .errors import UserError
from .hub import commit_of, is_hub_id, model_folder
from .lora import build_policy, is_lora_folder, lora_chain, stage_record
from .templates import check_template

STAGE_FILE = "stage.json"
METRICS_FILE = "metrics.jsonl"


class MetricsLog(TrainerCallback):
    """Appends every log (train steps, evaluations, the final summary) to a JSONL file."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def last_checkpoint(stage_dir: Path) -> Path | None:
    """The newest checkpoint-N whose trainer_state.json exists (it is written last, so a
    checkpoint cut short by a kill is skipped)."""
    done = [p for p in stage_dir.glob("checkpoint-*")
            if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _trim_metrics(path: Path, upto_step: int | None):
    """Drop log lines a resumed run will write again (or all of them on a fresh start)."""
    if not path.exists():
        return
    if upto_step is None:
        path.unlink()
        return
    keep = [ln for ln in path.read_text(encoding="utf-8").splitlines()
            if ln.strip() and json.loads(ln).get("step", 0) <= upto_step]
    path.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")


def _reference_path(stage: dict, config: dict, previous: Path, model: Path | None = None) -> Path:
    """``model``: the local folder of config["model"] (its hub snapshot), default the path as given."""
    ref = stage["reference"]
    if ref == "previous":
        return previous
    if ref == "model":
        return model if model is not None else Path(config["model"])
    if ref in {s["name"] for s in config["stages"]}:
        return Path(config["output_dir"]) / ref
    return model_folder(ref, f"stage {stage['name']}: reference") if is_hub_id(ref) else Path(ref)


def stage_template(stage: dict, config: dict) -> str | None:
    """The stage's prompt template (a preset expanded), or None."""
    return check_template({**config["defaults"], **stage["overrides"]}.get("prompt_template"))


def _load_stage_data(stage: dict, seed: int, template: str | None):
    d = stage["data"]
    source = {"name": d["name"], "revision": d["revision"], "template": template}
    train = load_pairs(d["path"], d["preference"], d["max_samples"], split=d["split"], **source)
    held = load_pairs(d["eval_path"], d["preference"], template=template) if d["eval_path"] else []
    if d["eval_split"]:
        held = held + load_pairs(d["path"], d["preference"], split=d["eval_split"], **source)
    if d["holdout"]:
        train, extra = split_pairs(train, d["holdout"], seed)
        held = held + extra
    return train, held


def _check_reference_template(stage: dict, reference: Path, template: str | None):
    """Warn when the reference stage was trained with another prompt template: the policy then
    starts from a model that saw its prompts in another form."""
    record = reference / STAGE_FILE
    if not record.is_file() or os.environ.get("RANK", "0") != "0":   # said once, by the first process
        return
    theirs = json.loads(record.read_text(encoding="utf-8")).get("prompt_template")
    if theirs != template:
        print(f"rsa train: warning: stage {stage['name']} renders prompts with template {template!r}, but its "
              f"reference {str(reference)!r} was trained with {theirs!r}", file=sys.stderr)


def run_stages(config, progress: bool = True, callbacks=None) -> list[Path]:
    """Train every unfinished stage in order; returns the stage folders (finished ones included).

    All data files are read and checked before any training. A stage with a stage.json is
    skipped; one with checkpoints but no stage.json resumes from its last checkpoint.
    ``callbacks``: extra transformers TrainerCallbacks for every stage.
    """
    config = load_config(config)
    out = Path(config["output_dir"])
    model = model_folder(config["model"], "model")
    if not model.is_dir():
        raise ValueError(f"model: no such model folder {config['model']!r}")
    pending = {}
    for stage in config["stages"]:
        if not (out / stage["name"] / STAGE_FILE).is_file():
            seed = {**config["defaults"], **stage["overrides"]}.get("seed", 42)
            pending[stage["name"]] = _load_stage_data(stage, seed, stage_template(stage, config))
    results, previous = [], model
    for stage in config["stages"]:
        stage_dir = out / stage["name"]
        reference = _reference_path(stage, config, previous, model)
        if stage["name"] in pending:
            train_stage(stage, config, reference, stage_dir, *pending[stage["name"]],
                        progress=progress, callbacks=callbacks, model_commit=commit_of(model))
        results.append(stage_dir)
        previous = stage_dir
    return results


def stage_args(stage: dict, config: dict, stage_dir: Path, progress: bool) -> RSAConfig:
    values = {"disable_tqdm": not progress, **config["defaults"], **stage["overrides"]}
    base_beta = values.get("beta", 0.1)
    if stage["lambda"] is not None:
        values["beta"] = base_beta / stage["lambda"]
    try:
        return RSAConfig(output_dir=str(stage_dir), **values)
    except ValueError as err:   # a value TrainingArguments rejects (our own checks ran in load_config)
        raise UserError(f"stage {stage['name']}: {err}") from err


def _lora_start(stage: dict, reference: Path, dtype: str) -> tuple[Path, list]:
    """(base folder, frozen adapters oldest first) a LoRA stage starts from: the reference itself,
    or the base and adapters of a LoRA reference, loaded as that stage was (rsa/lora.py)."""
    if not is_lora_folder(reference):
        return reference, []
    chain = lora_chain(reference)
    for key, mine, theirs in (("lora.quantization", stage["lora"]["quantization"], chain["quantization"]),
                              ("model_dtype", dtype, chain["model_dtype"])):
        if mine != theirs:
            raise UserError(f"stage {stage['name']}: {key} is {mine!r} but its reference {str(reference)!r} was "
                            f"trained with {theirs!r}; they share one base model, which must be loaded the same way")
    return Path(chain["base"]), chain["adapters"]


def _parameter_counts(model) -> dict:
    if hasattr(model, "get_nb_trainable_parameters"):   # PEFT: counts a 4-bit weight's elements
        trainable, total = model.get_nb_trainable_parameters()
    else:   # ds_numel: a parameter DeepSpeed ZeRO-3 partitioned at load time
        sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
        total, trainable = sum(n for n, _ in sizes), sum(n for n, grad in sizes if grad)
    return {"trainable_parameters": trainable, "parameters": total}


def train_stage(stage: dict, config: dict, reference: Path, stage_dir: Path, train_pairs, eval_pairs,
                progress: bool = True, callbacks=None, model_commit: str | None = None) -> Path:
    """Train one stage; ``model_commit``: the hub commit of the config's model, recorded in stage.json."""
    from .models import load_model, load_tokenizer
    from .trainer import RSATrainer

    lora = stage.get("lora")
    if not ((reference / "config.json").is_file() or is_lora_folder(reference)):
        raise ValueError(f"stage {stage['name']}: reference {str(reference)!r} is not a saved model folder "
                         "(did its stage finish?)")
    if lora is None and is_lora_folder(reference):
        raise UserError(f"stage {stage['name']}: trains full weights from the LoRA stage {str(reference)!r}: give "
                        "it lora too, or write that stage's full weights with `rsa merge DIR DIR --weight 0 --out "
                        "FULL` and start from that folder")
    args = stage_args(stage, config, stage_dir, progress)
    template = check_template(args.prompt_template)
    _check_reference_template(stage, reference, template)
    tokenizer = load_tokenizer(reference)
    train_set = PairDataset(train_pairs, tokenizer, args.max_length, args.max_prompt_length, progress, template)
    eval_set = PairDataset(eval_pairs, tokenizer, args.max_length, args.max_prompt_length,
                           template=template) if eval_pairs else None
    if lora is not None:
        # One copy of the base: the reference is the policy with its trainable adapter off.
        base, stack = _lora_start(stage, reference, args.model_dtype)
        set_seed(args.seed)   # the new adapter's random A: the same in every run of the config
        policy, ref_model = build_policy(base, stack, lora, args.model_dtype, args.device), None
    else:
        policy = load_model(reference, args.model_dtype)
        ref_model = load_model(reference, args.model_dtype)
    counts = _parameter_counts(policy)
    trainer = RSATrainer(model=policy, ref_model=ref_model, args=args, train_dataset=train_set,
                         eval_dataset=eval_set, processing_class=tokenizer,
                         callbacks=[MetricsLog(stage_dir / METRICS_FILE), *(callbacks or [])])
    resume = last_checkpoint(stage_dir)
    if trainer.is_world_process_zero():
        stage_dir.mkdir(parents=True, exist_ok=True)
        step = json.loads((resume / "trainer_state.json").read_text())["global_step"] if resume else None
        _trim_metrics(stage_dir / METRICS_FILE, step)
    trainer.accelerator.wait_for_everyone()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    trainer.save_model(str(stage_dir))
    final = {k: v for k, v in result.metrics.items()}
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    if train_logs:
        final.update({k: v for k, v in train_logs[-1].items() if k not in ("epoch", "step")})
    if eval_set is not None:
        final.update(trainer.evaluate())
    if trainer.is_world_process_zero():
        record = {
            "name": stage["name"], "reference": str(reference), "init": str(reference),
            "model": config["model"], "model_commit": model_commit,
            "data": stage["data"], "prompt_template": template, "objective": args.objective, "risk": args.risk,
            "beta": args.beta, "lambda": stage["lambda"],
            "base_beta": {**config["defaults"], **stage["overrides"]}.get("beta", 0.1),
            "alpha": args.alpha, "gamma": args.gamma, "label_smoothing": args.label_smoothing,
            "steps": trainer.state.global_step, "train_pairs": len(train_set),
            "eval_pairs": len(eval_set) if eval_set is not None else 0, **counts, "final_metrics": final,
        }
        if lora is not None:
            record["lora"] = stage_record(base, stack, lora, args.model_dtype)
        if not args.keep_checkpoints:
            # Their optimizer states are as large as the model several times over.
            for ckpt in stage_dir.glob("checkpoint-*"):
                shutil.rmtree(ckpt, ignore_errors=True)
        # The Trainer pickles its arguments; keep them as JSON instead, so the folder holds no pickle.
        (stage_dir / "training_args.bin").unlink(missing_ok=True)
        (stage_dir / "training_args.json").write_text(args.to_json_string(), encoding="utf-8")
        (stage_dir / STAGE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    trainer.accelerator.wait_for_everyone()
    return stage_dir
