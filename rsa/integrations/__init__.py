"""Optional integrations with other training libraries.

Each submodule imports its library on import, so ``import rsa.integrations`` itself stays light:
``from rsa.integrations.trl import RSADPOConfig, RSADPOTrainer`` (needs ``rsa-kernels[trl]``).
"""
