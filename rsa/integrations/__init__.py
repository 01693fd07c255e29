"""Optional integrations with other training libraries.

Each submodule imports its library on import, so ``import rsa.integrations`` itself stays light:
``from rsa.integrations.trl import RSADPOConfig, RSADPOTrainer`` (docs/trl.md) and
``RSAGRPOConfig, RSAGRPOTrainer`` (docs/grpo.md); both need ``rsa-kernels[trl]``.
"""
