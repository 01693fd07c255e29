"""Safe RLHF score models (the beaver reward and cost models), loaded natively.

Safe RLHF saves a score model as its base model plus a linear ``score_head`` (and a score
normalizer's buffers) under an architecture name ending in ``ForScore`` (``LlamaForScore``;
``LlamaModelForScore`` in older releases). Its ``ScoreModelMixin`` (safe_rlhf/models/
score_model/__init__.py), which this module follows without importing it or running remote code:

- ``score_head = nn.Linear(hidden_size, config.score_dim, bias=config.bias)``, score_dim 1 and
  bias False when the config does not say;
- the score of a text is the head's output at its last non-padding token (the last nonzero of
  the attention mask: "end score");
- the normalizer (``normalizer.mean`` / ``normalizer.var`` buffers in the weights, or ``mean`` /
  ``var`` in the config) changes the score only when ``config.do_normalize`` is true, by
  score_type: reward (x - mean) / (std + 1e-8), cost x / (std + 1e-8), critic unchanged;
  during Safe RLHF's training it only records statistics.

The text a score model reads is Safe RLHF's: prompt + response + EOS (rsa/eval/scorers.py).
The base model is loaded with Transformers' AutoModel from the same folder (safetensors only,
trust_remote_code=False); every base weight and the head must be in the folder. Positions are
counted from the attention mask, so a left-padded text scores as it does alone.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from rsa.errors import UserError

NORMALIZE = {"reward": "affine", "cost": "scale", "critic": "identity"}
EPSILON = 1e-8   # Safe RLHF's Normalizer.normalize


def is_score_model(folder) -> bool:
    """Whether a folder's config names one of Safe RLHF's score architectures (…ForScore)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return False
    try:
        archs = json.loads(path.read_text(encoding="utf-8")).get("architectures") or []
    except (ValueError, AttributeError):
        return False
    return any(isinstance(a, str) and a.endswith("ForScore") for a in archs)


class ScoreModel(nn.Module):
    """Base model + score head: ``forward(input_ids, attention_mask) -> (B, score_dim)`` end scores."""

    def __init__(self, base: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, normalize: str | None,
                 mean: torch.Tensor, var: torch.Tensor):
        super().__init__()
        self.base, self.normalize = base, normalize
        self.register_buffer("head_weight", weight.float())
        self.register_buffer("head_bias", bias.float() if bias is not None else None)
        self.register_buffer("mean", mean.float())
        self.register_buffer("var", var.float())
        self.config = base.config

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.long()
        if not bool(mask.any(dim=1).all()):
            raise ValueError("score model: a text with no tokens")
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        hidden = self.base(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                           use_cache=False).last_hidden_state
        # The last nonzero of each row's mask (right padding: its last token; left padding: the last column).
        cols = torch.arange(mask.shape[1], device=mask.device)
        end = torch.where(mask.bool(), cols, -1).max(dim=1).values
        end_hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), end].float()
        scores = end_hidden @ self.head_weight.T
        if self.head_bias is not None:
            scores = scores + self.head_bias
        if self.normalize == "affine":
            scores = (scores - self.mean) / (self.var.sqrt() + EPSILON)
        elif self.normalize == "scale":
            scores = scores / (self.var.sqrt() + EPSILON)
        return scores


def _tensors(folder: Path, names: list[str]) -> dict:
    """The named tensors wherever they are among the folder's safetensors files."""
    from safetensors import safe_open

    found = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for key in set(fh.keys()) & set(names):
                found[key] = fh.get_tensor(key)
    return found


def load_score_model(folder, what: str, device: str = "cpu", dtype: str = "auto") -> ScoreModel:
    """A Safe RLHF score model from a local folder; UserError naming ``what`` for a missing or
    misshapen head, a missing base weight, or a setting Safe RLHF would refuse."""
    from transformers import AutoConfig, AutoModel

    folder = Path(folder)
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    score_dim = int(getattr(config, "score_dim", 1) or 1)
    has_bias = bool(getattr(config, "bias", False))
    score_type = getattr(config, "score_type", "reward")
    if score_type not in NORMALIZE:
        raise UserError(f"{what}: config score_type {score_type!r} is not one of {', '.join(NORMALIZE)}")
    normalizer_type = getattr(config, "normalizer_type", None)
    if normalizer_type not in (None, "RunningMeanStd", "ExponentialMovingAverage"):
        raise UserError(f"{what}: config normalizer_type {normalizer_type!r} is not RunningMeanStd, "
                        "ExponentialMovingAverage or null")
    head = _tensors(folder, ["score_head.weight", "score_head.bias", "normalizer.mean", "normalizer.var"])
    hidden = config.hidden_size
    weight = head.get("score_head.weight")
    if weight is None:
        raise UserError(f"{what}: {str(folder)!r} is a Safe RLHF score model ({config.architectures[0]}) but its "
                        "safetensors hold no score_head.weight")
    if tuple(weight.shape) != (score_dim, hidden):
        raise UserError(f"{what}: score_head.weight has shape {tuple(weight.shape)}, but the config gives "
                        f"(score_dim, hidden_size) = ({score_dim}, {hidden})")
    bias = head.get("score_head.bias")
    if has_bias and (bias is None or tuple(bias.shape) != (score_dim,)):
        raise UserError(f"{what}: the config sets bias: true but score_head.bias is "
                        f"{'missing' if bias is None else 'of shape ' + str(tuple(bias.shape))}")
    if not has_bias and bias is not None:
        raise UserError(f"{what}: the weights hold score_head.bias but the config sets bias: false")
    stats = {}
    for key in ("mean", "var"):   # the weights' buffers, else the config's values, else 0 and 1
        value = head.get(f"normalizer.{key}")
        if value is None and getattr(config, key, None) is not None:
            value = torch.as_tensor(getattr(config, key), dtype=torch.float32)
        stats[key] = value.reshape(score_dim) if value is not None else torch.full((score_dim,), float(key == "var"))
    base, info = AutoModel.from_pretrained(str(folder), config=config, dtype=dtype, use_safetensors=True,
                                           trust_remote_code=False, output_loading_info=True)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise UserError(f"{what}: base weights missing from its safetensors: {', '.join(missing[:5])} "
                        "(Transformers would initialise them at random)")
    normalize = NORMALIZE[score_type] if getattr(config, "do_normalize", False) else None
    model = ScoreModel(base, weight, bias, normalize, stats["mean"], stats["var"])
    return model.to(device).eval().requires_grad_(False)
