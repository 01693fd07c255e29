"""StepMeter: the time, the peak memory and the split of each training step inside a Trainer.

A step is the Trainer's, from ``on_step_begin`` to ``on_step_end``: the policy's and the
reference's forward, the loss, the backward, gradient clipping, the optimizer's step and
zero_grad (the next batch is fetched before ``on_step_begin``, outside it).

Memory: on a CPU, the resident set's peak (VmHWM) during the step above the resident set
(VmRSS) at its start, the peak reset by writing "5" to /proc/self/clear_refs at the start
(the processes run with glibc returning large blocks to the system at once: MALLOC_ENV), so
the step's figure is above the model, the reference and, from the second step on, the
optimizer state. On CUDA, the allocator's peak above what was allocated at the start.

The split (seconds per step), from hooks and wrappers that cost microseconds:
- body_forward: the backbones' forwards (policy and reference; hooks on ``model.base_model``);
- head: the rest of the loss's forward (the lm-head products, the log-probabilities or the
  token statistics, the pair loss) plus the backward until the policy's final hidden states
  have their gradient;
- body_backward: the rest of the backward;
- optimizer: ``optimizer.step()``; other: the rest (clipping, zero_grad, the Trainer's bookkeeping).

Every figure is read on two clocks: wall time (``*_s``) and the process's CPU time
(``*_cpu_s``, time.process_time: all its threads, page faults included). On a machine shared
with other work, a one-thread process's CPU time is what the step costs it, whatever share of a
core it got: the steadier figure there (the report shows both).
"""
from __future__ import annotations

import time

import torch
from transformers import TrainerCallback

from .measure import MALLOC_ENV, memory_status

__all__ = ["StepMeter", "MALLOC_ENV", "instrument"]


class Clock(tuple):
    """(wall seconds, CPU seconds), with the arithmetic the split needs."""

    def __new__(cls, wall=0.0, cpu=0.0):
        return super().__new__(cls, (wall, cpu))

    def __sub__(self, other):
        other = other if isinstance(other, Clock) else Clock(other, other)
        return Clock(self[0] - other[0], self[1] - other[1])

    def __rsub__(self, other):
        return Clock(other, other) - self

    def __add__(self, other):
        other = other if isinstance(other, Clock) else Clock(other, other)
        return Clock(self[0] + other[0], self[1] + other[1])

    __radd__ = __add__

    def pos(self):
        return Clock(max(0.0, self[0]), max(0.0, self[1]))


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    if hasattr(model, "get_base_model"):  # PEFT
        model = model.get_base_model()
    return model


class StepMeter(TrainerCallback):
    def __init__(self, device: str = "cpu", warmup: int = 1):
        self.cuda = device.startswith("cuda")
        self.warmup = warmup
        self.steps: list[dict] = []   # one dict per step, warm-up steps included ("warmup": True)
        self._cur: dict | None = None
        self._hooked: set = set()
        self.loss_values: list[float] = []

    # ---------------------------------------------------------------- clock and memory
    def _now(self) -> Clock:
        if self.cuda:
            torch.cuda.synchronize()
        return Clock(time.perf_counter(), time.process_time())

    def _memory_start(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        base = memory_status()["VmRSS"]
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return base

    def _memory_peak(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated()
        return memory_status()["VmHWM"]

    # ---------------------------------------------------------------- Trainer callbacks
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:  # what every step's gradients take, once they all exist
            self.grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
            self.param_count = sum(p.numel() for p in model.parameters())
        self.optimizer = str(getattr(args.optim, "value", args.optim))

    def on_step_begin(self, args, state, control, **kwargs):
        self._cur = {"warmup": len(self.steps) < self.warmup, "body_forward": Clock(), "head": Clock()}
        self._cur["base_bytes"] = self._memory_start()
        self._cur["t0"] = self._now()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._cur is not None:
            self._cur["t_opt0"] = self._now()

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._cur is not None:
            self._cur["t_opt1"] = self._now()

    def on_step_end(self, args, state, control, **kwargs):
        c = self._cur
        if c is None:
            return
        t1 = self._now()
        c["peak_bytes"] = max(0, self._memory_peak() - c["base_bytes"])
        parts = {"total": t1 - c.pop("t0"), "optimizer": c.pop("t_opt1", Clock()) - c.pop("t_opt0", Clock())}
        back_end, hgrad, loss_end = c.pop("t_backward_end", None), c.pop("t_hgrad", None), c.pop("t_loss_end", None)
        if None not in (back_end, hgrad, loss_end):
            c["head"] += (hgrad - loss_end).pos()
            parts["body_backward"] = (back_end - hgrad).pos()
        parts.update(body_forward=c.pop("body_forward"), head=c.pop("head"))
        parts["other"] = (parts["total"] - sum(v for k, v in parts.items() if k != "total")).pos()
        step = dict(c)
        step["body_backward_s"] = step["body_backward_cpu_s"] = None
        for name, v in parts.items():
            step[f"{name}_s"], step[f"{name}_cpu_s"] = v
        self.steps.append(step)
        self._cur = None

    # ---------------------------------------------------------------- hooks
    def hook_backbone(self, model, grad_hook: bool) -> None:
        """Time ``model``'s backbone forward; for the policy, also when its output's gradient arrives."""
        body = _unwrap(model).base_model
        if id(body) in self._hooked:
            return
        self._hooked.add(id(body))
        meter = self

        def pre(_module, _args):
            if meter._cur is not None:
                meter._cur["t_body"] = meter._now()

        def post(_module, _args, out):
            c = meter._cur
            if c is None or "t_body" not in c:
                return
            c["body_forward"] += meter._now() - c.pop("t_body")
            hidden = out[0] if isinstance(out, tuple) else getattr(out, "last_hidden_state", out)
            if grad_hook and torch.is_tensor(hidden) and hidden.requires_grad:
                hidden.register_hook(lambda g: meter._mark("t_hgrad") or None)

        body.register_forward_pre_hook(pre)
        body.register_forward_hook(post)

    def _mark(self, key: str) -> None:
        if self._cur is not None:
            self._cur[key] = self._now()

    def timed_compute_loss(self, fn):
        """Wrap a trainer's compute_loss: the forward's end time, hooks on first use."""
        meter = self

        def compute_loss(trainer, model, inputs, *args, **kwargs):
            meter.hook_backbone(model, grad_hook=True)
            ref = getattr(trainer, "ref_model", None)
            if ref is not None:
                meter.hook_backbone(ref, grad_hook=False)
            c = meter._cur
            t = meter._now() if c is not None else Clock()
            out = fn(trainer, model, inputs, *args, **kwargs)
            if c is not None and model.training:
                end = meter._now()
                c["t_loss_end"] = end
                c["head"] += ((end - t) - c["body_forward"]).pos()
                loss = out[0] if isinstance(out, tuple) else out
                meter.loss_values.append(float(loss.detach()))
            return out
        return compute_loss

    def timed_training_step(self, fn):
        meter = self

        def training_step(trainer, *args, **kwargs):
            out = fn(trainer, *args, **kwargs)
            meter._mark("t_backward_end")
            return out
        return training_step

    def summary(self) -> dict:
        timed = [s for s in self.steps if not s["warmup"]]
        return {"steps": self.steps, "timed": len(timed), "losses": self.loss_values,
                "grad_bytes": getattr(self, "grad_bytes", None), "param_count": getattr(self, "param_count", None),
                "optimizer": getattr(self, "optimizer", None)}


def instrument(trainer_cls, meter: StepMeter) -> None:
    """Wrap ``trainer_cls``'s compute_loss and training_step (in this process only: each
    contender runs in a process of its own, rsa/bench/step_run.py)."""
    trainer_cls.compute_loss = meter.timed_compute_loss(trainer_cls.compute_loss)
    trainer_cls.training_step = meter.timed_training_step(trainer_cls.training_step)
