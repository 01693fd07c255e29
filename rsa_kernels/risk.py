"""Risk measures as strings ("kl", "erm:MU", "cvar:ALPHA", "ra_dpo_cvar:C"), parsed once.

Every backend receives a parsed :class:`Risk`; its integer ``code`` is what the compiled
kernels switch on, so keep the numbering stable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

KL, ERM, CVAR, RA_DPO_CVAR = 0, 1, 2, 3
_CODES = {"kl": KL, "erm": ERM, "cvar": CVAR, "ra_dpo_cvar": RA_DPO_CVAR}

# Per-row scalars every backend saves for its backward, in this column order:
#   kl           A, Ar, 0,   0,       0
#   erm          A, Ar, L,   0,       0        L = logsumexp((1+MU) zr - MU z) over q > 0
#   cvar         A, Ar, tau, c_above, c_atom   w = q*c_above above tau, q*c_atom at tau
#   ra_dpo_cvar  A, Ar, Q,   S,       0        w = q [D > Q], S = sum(w)
SAVED_WIDTH = 5


@dataclass(frozen=True)
class Risk:
    kind: str
    param: float = 0.0

    @property
    def code(self) -> int:
        return _CODES[self.kind]

    def __str__(self) -> str:
        return self.kind if self.kind == "kl" else f"{self.kind}:{self.param:g}"


def parse_risk(risk: "str | Risk", name: str = "risk") -> Risk:
    """Parse a risk string; raise ValueError naming ``name`` if it is not one SPEC allows."""
    if isinstance(risk, Risk):
        return risk
    if not isinstance(risk, str):
        raise ValueError(f"{name} must be a string such as 'kl', 'erm:1', 'cvar:0.9', got {risk!r}")
    kind, _, arg = risk.strip().partition(":")
    if kind not in _CODES:
        raise ValueError(
            f"{name}: unknown risk {risk!r}; expected 'kl', 'erm:MU', 'cvar:ALPHA' or 'ra_dpo_cvar:C'"
        )
    if kind == "kl":
        if arg:
            raise ValueError(f"{name}: 'kl' takes no parameter, got {risk!r}")
        return Risk("kl")
    try:
        value = float(arg)
    except ValueError:
        raise ValueError(f"{name}: {risk!r} needs a number after ':'") from None
    if not math.isfinite(value):
        raise ValueError(f"{name}: parameter of {risk!r} must be finite")
    if kind == "erm" and not value > 0:
        raise ValueError(f"{name}: MU of 'erm:MU' must be > 0, got {value}")
    if kind == "cvar" and not 0 <= value < 1:
        raise ValueError(f"{name}: ALPHA of 'cvar:ALPHA' must lie in [0, 1), got {value}")
    if kind == "ra_dpo_cvar" and not 0 < value < 1:
        raise ValueError(f"{name}: C of 'ra_dpo_cvar:C' must lie in (0, 1), got {value}")
    return Risk(kind, value)
