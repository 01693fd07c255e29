"""Reward and cost scorers: a sequence-classification model, a Safe RLHF score model, or a Python function.

SCORER syntax (the --reward and --cost flags):
- ``DIR`` or ``DIR#INDEX`` (DIR: a local folder or a hub id ORG/NAME[@REV], rsa/hub.py): a
  Hugging Face folder loaded with AutoModelForSequenceClassification and its own tokenizer;
  the score of a response is output logit INDEX (default 0) on the text prompt + response.
  A folder whose config names a Safe RLHF score architecture (…ForScore: the beaver reward
  and cost models) is loaded natively (rsa/eval/score_model.py): the score is its end score
  INDEX on prompt + response + EOS, the text Safe RLHF trains and evaluates them on.
- ``package.module:function``: a callable taking (prompts: list[str], responses: list[str])
  and returning one finite float per response. The current folder is importable.

Every batch of scores is checked: one per response, all finite; otherwise a ScorerError names
the scorer.
"""
from __future__ import annotations

import importlib
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch

from rsa.errors import UserError
from rsa.hub import resolve_scorer_spec

FUNCTION_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class ScorerError(UserError):
    """A scorer that cannot be loaded, or that returned the wrong number of scores or a non-finite one."""


class Scorer:
    """Base: ``scorer(prompts, responses) -> (n,) float64``, checked."""

    def __init__(self, spec: str, role: str):
        self.spec, self.role = spec, role

    @property
    def name(self) -> str:
        return f"{self.role} scorer {self.spec!r}"

    def __call__(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        return check_scores(self.score(list(prompts), list(responses)), len(responses), self.name)

    def score(self, prompts, responses):
        raise NotImplementedError


class FunctionScorer(Scorer):
    def __init__(self, spec: str, role: str = "score", function=None):
        super().__init__(spec, role)
        self.function = function if function is not None else import_function(spec, self.name)

    def score(self, prompts, responses):
        return self.function(prompts, responses)


class ModelScorer(Scorer):
    """Logit INDEX of a sequence classifier on prompt + response (a Safe RLHF score model: its end
    score INDEX on prompt + response + EOS), in batches."""

    def __init__(self, spec: str, role: str = "score", device: str = "cpu", batch_size: int = 16,
                 dtype: str = "auto"):
        from .loading import check_model_folder, load_classifier, load_tokenizer
        from .score_model import is_score_model, load_score_model

        super().__init__(spec, role)
        folder, index = split_index(spec, self.name)
        self.score_model = is_score_model(check_model_folder(folder, self.name))
        if self.score_model:
            self.model = load_score_model(folder, self.name, device, dtype)
            labels = int(getattr(self.model.config, "score_dim", 1) or 1)
        else:
            self.model = load_classifier(folder, self.name, device, dtype)
            labels = self.model.config.num_labels
        if index >= labels:
            raise ScorerError(f"{self.name}: output {index} requested but the model has {labels} output(s)")
        self.index, self.device, self.batch_size = index, device, batch_size
        self.tokenizer = load_tokenizer(folder, self.name)
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "left"   # a long text keeps its end: the response
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        # Safe RLHF scores prompt + response + EOS (its preference data sets append the EOS string).
        self.suffix = (self.tokenizer.eos_token or "") if self.score_model else ""
        limit = getattr(self.model.config, "max_position_embeddings", None) or self.tokenizer.model_max_length
        self.max_length = int(min(limit, self.tokenizer.model_max_length))
        bos = self.tokenizer.bos_token_id
        adds_bos = bos is not None and self.tokenizer("")["input_ids"][:1] == [bos]
        self.bos_text = self.tokenizer.bos_token if adds_bos else None

    def encode(self, text: str) -> list[int]:
        """Token ids of one text. A prompt rendered with a chat template may already start with the
        BOS string; the tokenizer's own BOS would then come twice, so none is added."""
        has_bos = self.bos_text is not None and text.startswith(self.bos_text)
        return self.tokenizer(text, add_special_tokens=not has_bos, truncation=True,
                              max_length=self.max_length)["input_ids"]

    @torch.no_grad()
    def score(self, prompts, responses):
        out = []
        for start in range(0, len(responses), self.batch_size):
            ids = [self.encode(p + r + self.suffix) for p, r in zip(prompts[start:start + self.batch_size],
                                                                    responses[start:start + self.batch_size])]
            enc = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(self.device)
            if self.score_model:
                out.append(self.model(enc["input_ids"], enc["attention_mask"])[:, self.index].cpu())
                continue
            # use_cache=False: a classifier would otherwise build a key/value cache of the whole batch.
            out.append(self.model(**enc, use_cache=False).logits[:, self.index].float().cpu())
        return torch.cat(out).numpy() if out else np.zeros(0)


def load_scorer(spec: str, role: str, device: str = "cpu", batch_size: int = 16, dtype: str = "auto") -> Scorer:
    """The scorer a --reward/--cost value names; ScorerError if it names nothing usable."""
    spec = resolve_scorer_spec(spec, role)
    folder = spec.rsplit("#", 1)[0] if "#" in spec else spec
    if Path(folder).is_dir():
        return ModelScorer(spec, role, device, batch_size, dtype)
    if FUNCTION_RE.match(spec):
        return FunctionScorer(spec, role)
    if "/" in folder or folder.startswith("."):
        raise ScorerError(f"{role} scorer {spec!r}: no such model folder {folder!r}")
    raise ScorerError(f"{role} scorer {spec!r}: neither a model folder (DIR or DIR#INDEX) nor "
                      "package.module:function")


def split_index(spec: str, name: str) -> tuple[str, int]:
    if "#" not in spec:
        return spec, 0
    folder, index = spec.rsplit("#", 1)
    if not index.isdigit():
        raise ScorerError(f"{name}: the output index after '#' must be a non-negative integer, got {index!r}")
    return folder, int(index)


def import_function(spec: str, name: str):
    module_name, func_name = spec.split(":")
    cwd = os.getcwd()
    if cwd not in sys.path:   # as `python -m` does: a scorer module next to the data is importable
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ScorerError(f"{name}: cannot import module {module_name!r} ({err})") from err
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ScorerError(f"{name}: module {module_name!r} has no function {func_name!r}")
    return func


def check_scores(scores, n: int, name: str) -> np.ndarray:
    """(n,) float64 of finite scores, or ScorerError naming the scorer."""
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().float().cpu().numpy()
    try:
        arr = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ScorerError(f"{name} returned {type(scores).__name__}, not numbers ({err})") from None
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ScorerError(f"{name} returned {arr.shape[0] if arr.ndim == 1 else 'shape ' + str(arr.shape)} "
                          f"score(s) for {n} response(s); it must return one float per response")
    bad = np.flatnonzero(~np.isfinite(arr))
    if len(bad):
        raise ScorerError(f"{name} returned a non-finite score ({arr[bad[0]]}) for response {bad[0]} of the batch "
                          f"({len(bad)} of {n} non-finite)")
    return arr
