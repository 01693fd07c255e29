"""Independent jobs (the demo's seeds) in parallel worker processes, one torch thread each.

A worker holds a QueueProgress in place of the progress bar: the same calls, sent to the main
process, which applies them to its bar. Workers ignore Ctrl-C (the main process stops them)
and exit as soon as the main process is gone, even when it was killed and could not tell them.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time

import torch

from . import isa


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def one_thread():
    """One torch thread and no Transformers loading bars, restored afterwards.

    One thread: the demo's models are tiny, so extra threads only add synchronisation, and on a
    shared machine oversubscribed threads made every step several times slower; the cores are
    used by running jobs in parallel processes instead."""
    from transformers.utils import logging as hf_logging

    threads, hf_bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()   # "Loading weights" bars for every tiny model: noise here
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if hf_bars:
            hf_logging.enable_progress_bar()


class QueueProgress:
    """A worker's stand-in for the progress bar (doing / advance / postfix)."""

    def __init__(self, queue):
        self.queue = queue

    def doing(self, what: str):
        self.queue.put(("doing", what))

    def advance(self, units: int):
        self.queue.put(("advance", units))

    def postfix(self, **kw):
        self.queue.put(("postfix", kw))


def _drain(queue, progress):
    """Apply the workers' messages to the bar until the None that ends them."""
    while (msg := queue.get()) is not None:
        kind, value = msg
        if kind == "postfix":
            progress.postfix(**value)
        else:
            getattr(progress, kind)(value)


_worker = {}


def _watch_parent(parent: int):
    while os.getppid() == parent:
        time.sleep(0.2)
    os._exit(1)


def _init_worker(queue, parent: int):
    # the `rsa` program's rules (rsa.optional) hold in its spawned workers too: only the
    # environment is inherited, so `kernels` and the optional packages the program kept out
    # are kept out here again, before a job's imports reach them
    from rsa.optional import follow_parent
    follow_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    _worker["queue"] = queue


def _call(job):
    fn, arg = job
    with one_thread():
        return fn(arg, QueueProgress(_worker["queue"]))


def parallel_map(fn, jobs: list, workers: int, progress, env: dict[str, str] | None = None):
    """fn(job, progress) for every job, in this process when ``workers`` is 1 and there is no
    ``env``, else in that many spawned processes started with ``env`` added to their environment
    (isa.cap_environment(): it must be there before torch is imported); yields the results as
    they finish. ``fn`` must be a module-level function (it is pickled) and ``progress`` has
    doing / advance / postfix."""
    if workers == 1 and env is None:
        for job in jobs:
            yield fn(job, progress)
        return
    # spawn, not fork: a forked child inherits torch's thread pools in whatever state they are
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    reader = threading.Thread(target=_drain, args=(queue, progress), daemon=True)
    reader.start()
    try:
        with isa.environment(env):
            pool = ctx.Pool(workers, initializer=_init_worker, initargs=(queue, os.getpid()))
        try:
            yield from pool.imap_unordered(_call, [(fn, job) for job in jobs])
            # Done: the workers exit on their own, so that their exit handlers release what the
            # libraries in them hold (a spawned worker's tqdm lock is a named semaphore, which a
            # terminated worker leaves to the resource tracker's "leaked semaphore" warning).
            pool.close()
            pool.join()
        finally:
            pool.terminate()   # on an error or Ctrl-C; a no-op once the workers have exited
    finally:
        queue.put(None)
        reader.join()
        queue.close()
        queue.join_thread()
