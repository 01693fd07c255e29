"""What an evaluation run is: models, prompts, scorers and sampling settings, checked up front."""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rsa.errors import UserError
from rsa.hub import is_hub_id

# "auto": as stored in each checkpoint (an FSDP-saved float32 checkpoint stays float32: 4 bytes a parameter).
DTYPES = ("bfloat16", "float16", "float32", "auto")
_WARNED: set[str] = set()


@dataclass
class EvalSettings:
    models: dict[str, str]                 # name -> folder or hub id ORG/NAME[@REV]
    prompts: str                           # a file, a data set folder or a hub data set id
    cost: str
    reward: str | None = None
    reference: str | None = None
    samples: int = 4                       # responses per prompt
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 16                   # responses sampled (and scored) at once
    seed: int = 0
    threshold: float | None = None         # cost >= threshold is catastrophic
    device: str = "cpu"
    dtype: str | None = None               # of every model loaded; None: bfloat16 on CUDA, float32 on CPU
    prompts_name: str | None = None        # a data set's config (datasets' `name`)
    prompts_split: str | None = None       # a data set's split (required for a data set)
    prompts_column: str = "prompt"         # the field holding each prompt
    prompt_template: str | None = None     # format string with {prompt} or a preset (rsa/templates.py)
    prompts_sha256: str = field(default="", init=False)
    sources: dict = field(default_factory=dict, init=False)   # hub id -> its snapshot commit

    def __post_init__(self):
        if not self.models:
            raise UserError("--model: give at least one model folder")
        for name, value, low in (("--samples", self.samples, 1), ("--max-new-tokens", self.max_new_tokens, 1),
                                 ("--batch-size", self.batch_size, 1), ("--seed", self.seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UserError(f"{name} must be an integer >= {low}, got {value!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise UserError(f"--temperature must be a positive number, got {self.temperature!r}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p!r}")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise UserError(f"--threshold must be a finite number, got {self.threshold!r}")
        if self.device != "cpu" and not (self.device == "cuda" or self.device.startswith("cuda:")):
            raise UserError(f"--device must be cpu, cuda or cuda:K, got {self.device!r}")
        if self.device.startswith("cuda"):
            import torch
            if not torch.cuda.is_available():
                raise UserError(f"--device {self.device}: CUDA is not available here")
        if self.dtype is None:
            # bfloat16 halves the memory of every model on a GPU; CPUs without bfloat16 matrix units run it
            # far slower than float32, and small CPU runs do not need the memory.
            self.dtype = "bfloat16" if self.device.startswith("cuda") else "float32"
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        from rsa.templates import check_template
        try:
            self.prompt_template = check_template(self.prompt_template, "--prompt-template")
        except ValueError as err:
            raise UserError(str(err)) from None
        self._check_prompts()
        from .loading import check_model_folder   # before any model is loaded, paths as given
        self.models = {name: str(check_model_folder(self._local(d, f"--model {name}"), f"--model {name}").resolve())
                       for name, d in self.models.items()}
        if self.reference is not None:
            ref = self._local(self.reference, "--reference")
            self.reference = str(check_model_folder(ref, "--reference").resolve())
        self._check_trained_templates()
        from rsa.hub import commit_of, is_hub_id, resolve_scorer_spec
        for role in ("cost", "reward"):   # a hub scorer is fetched (or found in the cache) up front too
            spec = getattr(self, role)
            if spec is None:
                continue
            resolved = resolve_scorer_spec(spec, f"--{role}")
            folder = spec.rpartition("#")[0] if "#" in spec else spec
            if is_hub_id(folder):
                self.sources[folder] = commit_of(Path(resolved.rpartition("#")[0] if "#" in spec else resolved))
            setattr(self, role, resolved)

    def _check_trained_templates(self):
        """Warn when a model is an `rsa train` stage trained with another prompt template than the one
        its prompts are sampled with here (stage.json records it)."""
        import json
        import sys
        for name, folder in self.models.items():
            record = Path(folder) / "stage.json"
            if not record.is_file():
                continue
            theirs = json.loads(record.read_text(encoding="utf-8")).get("prompt_template")
            message = (f"rsa eval: warning: model {name} was trained with prompt template {theirs!r} but is sampled "
                       f"with {self.prompt_template!r} (--prompt-template)")
            if theirs != self.prompt_template and message not in _WARNED:   # once, if settings are made twice
                _WARNED.add(message)
                print(message, file=sys.stderr)

    def _local(self, value: str, what: str) -> Path:
        """A model folder: the path, or the cache snapshot of a hub id (recorded in ``sources``)."""
        from rsa.hub import commit_of, is_hub_id, model_folder
        folder = model_folder(value, what)
        if is_hub_id(value):
            self.sources[value] = commit_of(folder)
        return folder

    def _check_prompts(self):
        prompts = Path(self.prompts).expanduser()
        if not self.prompts_column:
            raise UserError("--prompts-column must name a field")
        if prompts.is_file():
            if self.prompts_name is not None or self.prompts_split is not None:
                raise UserError(f"--prompts {self.prompts!r} is a file; --prompts-name and --prompts-split apply to a "
                                "data set (a hub id or a data set folder)")
            self.prompts = str(prompts.resolve())
            self.prompts_sha256 = hashlib.sha256(prompts.read_bytes()).hexdigest()
            return
        from rsa.hub import FILE_SUFFIXES, commit_of, dataset_folder, is_hub_id
        if not (prompts.is_dir() or is_hub_id(self.prompts)):
            hint = "" if self.prompts.lower().endswith(FILE_SUFFIXES) else " (nor a data set folder, nor a hub id ORG/NAME)"
            raise UserError(f"--prompts: no such file {self.prompts!r}{hint}")
        if self.prompts_split is None:
            raise UserError(f"--prompts {self.prompts!r} is a data set: give its split with --prompts-split "
                            "(e.g. test)")
        if prompts.is_dir():
            self.prompts = str(prompts.resolve())
        else:   # fetched (or found in the cache) now; the same snapshot is read when sampling starts
            self.sources[self.prompts] = commit_of(dataset_folder(self.prompts, "--prompts", self.prompts_name))

    def identity(self) -> dict:
        """The settings a resumed run must share with the run it continues (the threshold only
        changes the report, so it may differ)."""
        out = asdict(self)
        out.pop("threshold")
        return out


def parse_models(values: list[str]) -> dict[str, str]:
    """--model DIR or NAME=DIR (an existing folder is always a folder, even with '=' in it); DIR may
    be a hub id ORG/NAME[@REV], named NAME by default."""
    models = {}
    for value in values:
        if "=" in value and not Path(value).is_dir():
            name, folder = value.split("=", 1)
            if not name or not folder:
                raise UserError(f"--model {value!r}: expected DIR or NAME=DIR")
        else:
            folder = value
            name = Path(value.split("@")[0].rstrip("/") if is_hub_id(value) else value.rstrip("/")).name or value
        if name in models:
            raise UserError(f"--model: two models are named {name!r}; name them with NAME=DIR")
        models[name] = folder
    return models
