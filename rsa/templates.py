"""Prompt templates: how a text prompt is rendered before it is tokenized, everywhere alike.

A template is a format string with one field, ``{prompt}`` (``{{`` and ``}}`` stand for
literal braces), or a preset name. The same rendering is used for the training pairs
(rsa.data), for sampling in `rsa eval` and for the text a scorer reads (template + response).
Message-list prompts are rendered by the tokenizer's chat template instead; a template
together with message prompts is refused.
"""
from __future__ import annotations

import string

# Safe RLHF's and SACPO's conversation format (PROMPT_BEGIN + PROMPT_USER + PROMPT_ASSISTANT):
# no space after the last colon, the response follows it directly.
SAFE_RLHF = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"
PRESETS = {"safe-rlhf": SAFE_RLHF}


def check_template(value, what: str = "prompt_template") -> str | None:
    """The template string (a preset name expanded), or None; ValueError naming ``what``."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a format string with {{prompt}} or one of {sorted(PRESETS)}, got {value!r}")
    if value in PRESETS:
        return PRESETS[value]
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(value) if name is not None]
    except ValueError as err:
        raise ValueError(f"{what}: {value!r} is not a valid format string ({err}); write literal braces as "
                         "{{ and }}") from None
    names = [f[0] for f in fields]
    if "prompt" not in names:
        raise ValueError(f"{what}: {value!r} has no {{prompt}} field (presets: {', '.join(sorted(PRESETS))})")
    bad = [f for f in fields if f != ("prompt", "", None)]
    if bad:
        raise ValueError(f"{what}: {value!r} may hold only the field {{prompt}}, found {{{bad[0][0]}}} "
                         "(write literal braces as {{ and }})")
    return value


def apply_template(template: str | None, prompt: str) -> str:
    return prompt if template is None else template.format(prompt=prompt)
