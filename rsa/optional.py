"""What an `rsa` process may import: no code from the hub, and the optional PEFT,
bitsandbytes and DeepSpeed only where the run uses them.

Transformers, accelerate and PEFT import these three as soon as they are installed
(transformers.trainer_utils imports PEFT, PEFT imports bitsandbytes, accelerate.utils
DeepSpeed), so a run that uses none of them would still pay for them, and bitsandbytes, on a
CPU with AVX512-BF16, tries at import to download a kernel from the hub through the `kernels`
package (`kernels.get_kernel("kernels-community/quantization-bitsandbytes")`), printing a
warning line when that fails. Their availability checks all ask importlib.util.find_spec,
which answers None for a name whose sys.modules entry is None (Python's own way of making a
module unimportable): that is how a package is kept out here.

Applied by rsa.cli only when it runs as the `rsa` program (its own process), never to a
library caller's process.
"""
from __future__ import annotations

import logging
import os
import sys

OPTIONAL = ("peft", "bitsandbytes", "deepspeed")
# The packages a process keeps out, for the Python processes it starts (`rsa demo`'s workers):
# sys.modules is not inherited, the environment is.
KEPT_OUT_VARIABLE = "RSA_KEPT_OUT"
# bitsandbytes' CPU backend logs this when `kernels` cannot give it the hub kernel; it then
# uses the kernel of its own library (libbitsandbytes_cpu), which is what we want.
_BNB_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_FALLBACK = "Failed to load CPU gemm_4bit_forward from kernels-community"


def no_code_from_the_hub():
    """No kernel downloaded from the hub in this process (or its children).

    Transformers (>= 5) replaces layers by hub kernels in every from_pretrained unless
    USE_HUB_KERNELS says no (its documented switch); set here, it also reaches the processes
    this one starts. bitsandbytes fetches its CPU kernel through `kernels` regardless: the
    package is made unimportable, and bitsandbytes' warning about the kernel it therefore does
    not fetch is dropped.
    """
    os.environ["USE_HUB_KERNELS"] = "NO"
    if "kernels" not in sys.modules:
        sys.modules["kernels"] = None
    logger = logging.getLogger(_BNB_LOGGER)
    if _drop_bnb_fallback_warning not in logger.filters:
        logger.addFilter(_drop_bnb_fallback_warning)


def _drop_bnb_fallback_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(_BNB_FALLBACK)


def keep_out(names, children: bool = False) -> list[str]:
    """Make the packages ``names`` unimportable in this process (their availability checks say
    no), unless already imported; with ``children``, in the processes it starts that call
    follow_parent() too. Returns the names kept out."""
    out = [name for name in names if name not in sys.modules]
    for name in out:
        sys.modules[name] = None
    if children:
        os.environ[KEPT_OUT_VARIABLE] = ",".join(names)
    return out


def follow_parent():
    """In a process an `rsa` program started: the same rules as the program (no code from the
    hub, the packages it kept out for its children)."""
    if os.environ.get("USE_HUB_KERNELS") == "NO":
        no_code_from_the_hub()
    keep_out([n for n in os.environ.get(KEPT_OUT_VARIABLE, "").split(",") if n in OPTIONAL])


def deepspeed_from_the_launcher() -> bool:
    """Whether `accelerate launch` was told to use DeepSpeed (its plugin then imports it)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true", "yes")
