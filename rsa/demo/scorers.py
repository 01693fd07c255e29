"""The demo task's reward and cost as function scorers (rsa.eval.scorers): (prompts, responses) -> floats.

Usable from the command line too: ``rsa eval --cost rsa.demo.scorers:cost --reward
rsa.demo.scorers:reward`` on a demo model with prompts "USER ask cook ASSISTANT", ...
A response is the task's words separated by spaces.
"""
from __future__ import annotations

from . import task


def reward(prompts: list[str], responses: list[str]) -> list[float]:
    return [task.reward(task.parse_prompt(p)[0], r.split()) for p, r in zip(prompts, responses)]


def cost(prompts: list[str], responses: list[str]) -> list[float]:
    return [task.cost(task.parse_prompt(p)[0], r.split()) for p, r in zip(prompts, responses)]
