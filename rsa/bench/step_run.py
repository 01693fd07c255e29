"""`python -m rsa.bench.step_run OUT.json --mode quick|full|tiny`: the training-step comparison.

Every contender runs, per vocabulary and round, in a process of its own: on a CPU a child
forked from this process after the heavy imports (torch, transformers, TRL, Liger) and before
any tensor work, so it starts fresh without paying the imports again; on CUDA a new
interpreter (CUDA cannot be forked). Rounds alternate the contenders' order, so a slow spell
of a shared machine does not fall on one contender. This process should be started with
MALLOC_ENV (rsa/bench/measure.py) in its environment: glibc then returns large blocks to the
system at once, and the resident set follows what the step holds.

Also measured apart, per vocabulary: the lm head's products at the step's size (policy
forward, its two backward products, the reference's forward), for the cost split in the report.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

from .step_workload import StepSizes, sizes_for


def _quiet() -> None:
    """No progress bars of TRL's dataset preparation, no deprecation warnings, in every child's log."""
    import warnings

    import datasets

    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)


def _preload() -> None:
    """The imports every child needs (a forked child inherits them), no tensor work."""
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    import rsa.integrations.trl  # noqa: F401
    import rsa.stepwise  # noqa: F401
    import rsa.trainer  # noqa: F401
    for optional in ("liger_kernel.chunked_loss", "deepspeed"):  # (the Trainer imports DeepSpeed if present)
        try:
            __import__(optional)
        except ImportError:
            pass


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def plain_bytes_estimate(sizes: StepSizes, vocab: int) -> int:
    """What contender 6 needs at least: about 14 float32 (tokens, V) tensors (both models' logits,
    log_softmax, softmax, D, the sort's indices and gathered copies, their gradients)."""
    return 14 * sizes.tokens_per_step() * vocab * 4


def measure(name: str, sizes: StepSizes, vocab: int, device: str, threads: int, bf16: bool, work: str) -> dict:
    """One contender's steps at one vocabulary, in the calling (fresh) process."""
    import torch

    from .step_contenders import build_trainer, run_rsa_train
    from .step_meter import StepMeter, instrument

    torch.set_num_threads(threads)
    if name == "plain" and not device.startswith("cuda"):
        need, avail = plain_bytes_estimate(sizes, vocab), _mem_available()
        if avail is not None and avail < 1.3 * need:
            raise MemoryError(f"skipped: needs about {need / 2**30:.1f} GiB for its logits, "
                              f"{avail / 2**30:.1f} GiB available")
    meter = StepMeter(device, warmup=sizes.warmup)
    if name == "rsa_train":
        run_rsa_train(sizes, vocab, device, meter, bf16=bf16, work=work)
    else:
        trainer = build_trainer(name, sizes, vocab, os.path.join(work, f"trainer-{name}"), device, bf16,
                                callbacks=[meter])
        instrument(type(trainer), meter)
        trainer.train()
    return {**meter.summary(), "pid": os.getpid()}


def products(sizes: StepSizes, vocab: int, device: str, threads: int, repeats: int = 3) -> dict:
    """Seconds of the lm head's four products at the step's positions (N = every position but the
    last of each sequence): policy h @ W.T, its backward g @ W and g.T @ h, reference h @ W.T."""
    import torch

    torch.set_num_threads(threads)
    n = 2 * sizes.pairs * (sizes.prompt + sizes.response - 1)
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(n, sizes.hidden, generator=g, device=dev)
    w = torch.randn(vocab, sizes.hidden, generator=g, device=dev)
    grad = torch.randn(n, vocab, generator=g, device=dev)
    times, cpu = [], []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        z = h @ w.t()
        del z
        dh = grad @ w
        dw = grad.t() @ h
        z = h @ w.t()
        del z, dh, dw
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {"n": n, "h": sizes.hidden, "v": vocab, "four_products_s": statistics.median(times), "data_s": times,
            "four_products_cpu_s": statistics.median(cpu)}


def _forked(fn, *args) -> dict:
    """fn(*args) in a forked child; {"ok": result} or {"error": message}."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the parent's code
        os.close(r)
        try:
            payload = {"ok": fn(*args)}
        except BaseException as err:  # noqa: BLE001 - reported to the parent, which carries on
            payload = {"error": f"{type(err).__name__}: {err}"[:600], "traceback": traceback.format_exc()[-4000:]}
        with os.fdopen(w, "wb") as f:
            f.write(json.dumps(payload).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        return {"error": f"the process ended without a result (wait status {status}; killed for memory?)"}
    return json.loads(data)


def _spawned(kind: str, spec: dict, work: str) -> dict:
    """The same in a new interpreter (CUDA cannot be forked)."""
    path = Path(work) / f"child-{os.getpid()}-{time.time_ns()}.json"
    cmd = [sys.executable, "-m", "rsa.bench.step_run", "--child", json.dumps({"kind": kind, **spec}), str(path)]
    rc = subprocess.run(cmd).returncode
    if not path.exists():
        return {"error": f"the child process ended with status {rc} and no result"}
    out = json.loads(path.read_text())
    path.unlink()
    return out


def _child_main(spec_text: str, path: str) -> int:
    _quiet()
    spec = json.loads(spec_text)
    sizes = StepSizes(**{**spec["sizes"], "vocabs": tuple(spec["sizes"]["vocabs"])})
    try:
        if spec["kind"] == "products":
            result = {"ok": products(sizes, spec["vocab"], spec["device"], spec["threads"])}
        else:
            result = {"ok": measure(spec["name"], sizes, spec["vocab"], spec["device"], spec["threads"],
                                    spec["bf16"], spec["work"])}
    except BaseException as err:  # noqa: BLE001
        result = {"error": f"{type(err).__name__}: {err}"[:600], "traceback": traceback.format_exc()[-4000:]}
    Path(path).write_text(json.dumps(result))
    return 0


def run(sizes: StepSizes, device: str, threads: int, work: str, names: list[str] | None = None,
        bf16: bool = False, log=print, save=None) -> dict:
    """Measure every contender at every vocabulary, ``sizes.rounds`` times, interleaved;
    ``save(result)`` after each run, so a stopped run keeps what it measured."""
    from .step_contenders import contenders_for

    names = names or contenders_for(device)
    cuda = device.startswith("cuda")
    _quiet()
    if not cuda:
        _preload()
    started, runs, prods = time.time(), [], {}

    def result():
        return {"sizes": sizes.as_dict(), "device": device, "threads": threads,
                "dtype": "bfloat16 autocast" if bf16 else "float32", "contenders": names, "runs": runs,
                "products": prods, "seconds": round(time.time() - started, 1)}
    Path(work).mkdir(parents=True, exist_ok=True)
    spec = {"sizes": sizes.as_dict(), "device": device, "threads": threads, "bf16": bf16, "work": work}
    total = sizes.rounds * len(sizes.vocabs) * len(names)
    done = 0
    for vocab in sizes.vocabs:
        res = (_spawned("products", {**spec, "vocab": vocab}, work) if cuda
               else _forked(products, sizes, vocab, device, threads))
        prods[str(vocab)] = res.get("ok") or {"error": res.get("error")}
    for rnd in range(sizes.rounds):
        order = names[rnd % len(names):] + names[:rnd % len(names)]   # each round starts one later
        for vocab in sizes.vocabs:
            for name in order:
                t = time.time()
                res = (_spawned("step", {**spec, "name": name, "vocab": vocab}, work) if cuda
                       else _forked(measure, name, sizes, vocab, device, threads, bf16, work))
                done += 1
                row = {"name": name, "vocab": vocab, "round": rnd, "wall_s": round(time.time() - t, 1)}
                if "ok" in res:
                    row.update(res["ok"])
                    timed = [s["total_s"] for s in row["steps"] if not s["warmup"]]
                    msg = f"median step {statistics.median(timed):.3g} s" if timed else "no timed step"
                else:
                    row["error"] = res["error"]
                    msg = "error: " + res["error"]
                    if res.get("traceback"):
                        log(res["traceback"])
                log(f"[{done}/{total}] round {rnd + 1}, V={vocab}, {name}: {msg} ({row['wall_s']} s)")
                runs.append(row)
                if save is not None:
                    save(result())
    return result()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return _child_main(argv[1], argv[2])
    p = argparse.ArgumentParser(prog="python -m rsa.bench.step_run", description=__doc__.split("\n")[0])
    p.add_argument("out")
    p.add_argument("--mode", default="quick")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (float32 weights), as Trainer's bf16=True")
    p.add_argument("--contenders", default=None, help="comma-separated names (default: all for the device)")
    p.add_argument("--vocabs", default=None, help="comma-separated vocabulary sizes (default: the mode's)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    a = p.parse_args(argv)
    import torch

    vocabs = tuple(int(v) for v in a.vocabs.split(",")) if a.vocabs else None
    sizes = sizes_for(a.mode, vocabs=vocabs, rounds=a.rounds, steps=a.steps)
    out = Path(a.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    names = [n.strip() for n in a.contenders.split(",")] if a.contenders else None
    command = "python -m rsa.bench.step_run " + " ".join(argv)

    def save(res):
        out.write_text(json.dumps({**res, "mode": a.mode, "command": command}, indent=1))
    result = run(sizes, a.device, a.threads or torch.get_num_threads(), str(out.parent / "step-work"), names,
                 bf16=a.bf16, save=save)
    save(result)
    result.update(mode=a.mode, command=command)
    from .collect import machine_info
    from .step_report import render_section

    print("\n".join(render_section({"train_step": result, "machine": machine_info(a.device)})))
    print(f"{out} written in {result['seconds']} s")
    return 0 if not any("error" in r for r in result["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
