"""`rsa train CONFIG.yaml`: run the stages of a stepwise-alignment config (rsa.stepwise)."""
from __future__ import annotations

from pathlib import Path


def add_arguments(parser):
    parser.add_argument("config", help="YAML run config (see docs/trainer.md)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    # The file is read before Transformers is imported (seconds): a missing or malformed
    # file is reported at once.
    raw = read_yaml(args.config)
    if getattr(args, "_own_process", False):
        from rsa.optional import keep_out
        keep_out(unused_packages(raw))
    from rsa.stepwise import run_stages
    for path in run_stages(args.config, progress=not args.no_progress):
        print(path)
    return 0


def read_yaml(path):
    import yaml
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config: no such file {str(path)!r}")
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except yaml.YAMLError as err:
        raise ValueError(f"config: {str(path)!r} is not valid YAML: {err}") from err


def unused_packages(raw) -> list[str]:
    """The optional packages (rsa.optional) a config cannot need: PEFT without any `lora:`
    mapping, bitsandbytes without a `quantization` in one, DeepSpeed without a `deepspeed`
    setting (or accelerate launch's). A config whose layout is wrong keeps them all
    (load_config then says what is wrong)."""
    from rsa.optional import deepspeed_from_the_launcher
    if not isinstance(raw, dict):
        return []
    defaults, stages = raw.get("defaults") or {}, raw.get("stages")
    if not isinstance(defaults, dict) or not isinstance(stages, list) or not all(isinstance(s, dict) for s in stages):
        return []
    mappings = [defaults, *stages]
    loras = [m.get("lora") for m in mappings]
    unused = []
    if all(lora is None for lora in loras):
        unused.append("peft")
    if not any(isinstance(lora, dict) and lora.get("quantization") is not None for lora in loras) \
            and all(lora is None or isinstance(lora, dict) for lora in loras):
        unused.append("bitsandbytes")
    if not any(m.get("deepspeed") for m in mappings) and not deepspeed_from_the_launcher():
        unused.append("deepspeed")
    return unused
