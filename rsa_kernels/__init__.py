"""rsa_kernels: exact, fused kernels for risk-aware token-level preference losses (RSA).

See SPEC (docs/math.md) for the definitions; every backend computes exactly those.
"""
from .backends import available_backends
from .fused_linear import fused_linear_preference_loss, fused_linear_token_stats
from .loss import preference_loss
from .risk import Risk, parse_risk
from .token_stats import TokenStats, token_stats

__version__ = "0.1.0"
__all__ = ["token_stats", "preference_loss", "fused_linear_token_stats", "fused_linear_preference_loss",
           "available_backends", "TokenStats", "Risk", "parse_risk"]
