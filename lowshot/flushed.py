"""One thread that computes with denormal floats flushed to zero: where the probe's solver runs.

Softmax probabilities far below a row's largest underflow into float32's denormal range (below 1.2e-38), and on x86
an operation that reads or writes a denormal takes a microcode assist, about a hundred times the normal cost. Probe
fits make them by the thousand: at MSN ``logistic_eval.py``'s default lambda (0.00025), up to a third of the
probabilities of a 1,000-class 5-shot fit, a tenth of a 1-shot fit's, and some even at 0.0025 on real features of
look-alike classes. ``benchmarks/denormals.py``: the gradient product (1,000 classes x 5,000 rows x 384) with 4% of
its probabilities denormal took 104 ms on the caller's thread against 12.6 here (95%: 2.2 s against 16 ms); the
5-shot fit at lambda 0.00025 4.4 s against 3.0 s, same iterations, same objective.

FTZ and DAZ (flush to zero, denormals are zero: ``torch.set_flush_denormal``) make those values zero instead. They
are per-thread state (MXCSR on x86): set on the caller's thread they would change the floating-point environment of
the caller's own code. So the solver runs on a thread of its own that sets them before its first torch op, and
torch's OpenMP workers, which it starts, compute in the same mode (``tests/test_flushed.py`` checks every worker's
share of a product). The caller's threads, and everything else torch does in the process (extraction included),
keep their floating-point environment; every fit computes in the same mode, whoever calls it.

Fits run one at a time, in the order they are asked for. A caller interrupted while it waits (Ctrl-C) sets a flag
the solver checks each iteration (:func:`check_cancelled`), so the thread is free again within an iteration.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import torch

THREAD_NAME = "lowshot-flushed"

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_cancel = threading.Event()
_flushes: list[bool] = []  # what torch.set_flush_denormal answered on the thread (False: not supported here)


class Cancelled(Exception):
    """The caller stopped waiting for this computation (see :func:`check_cancelled`)."""


def run_flushed(fn: Callable[..., Any], /, *args, **kwargs) -> Any:
    """``fn(*args, **kwargs)`` on the flushed thread, with the caller's torch thread count; returns its result or
    raises its exception. Called from that thread itself, runs ``fn`` directly."""
    if threading.current_thread().name.startswith(THREAD_NAME):
        return fn(*args, **kwargs)
    future = _executor().submit(_call, torch.get_num_threads(), fn, args, kwargs)
    try:
        return future.result()
    except BaseException:
        if not future.done():  # interrupted while waiting: stop the computation at its next check, then go on
            _cancel.set()
            wait([future])
            _cancel.clear()
        raise


def check_cancelled() -> None:
    """Raise :class:`Cancelled` if the caller waiting for this computation was interrupted (long loops call it)."""
    if _cancel.is_set():
        raise Cancelled("interrupted by the caller")


def flushes() -> bool:
    """Whether denormals are flushed on the thread (False where the CPU or this torch cannot; starts the thread)."""
    run_flushed(lambda: None)
    return bool(_flushes and _flushes[0])


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(1, thread_name_prefix=THREAD_NAME, initializer=_start)
        return _pool


def _start() -> None:
    _flushes.append(torch.set_flush_denormal(True))  # before this thread's first parallel op (see above)


def _call(threads: int, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    if torch.get_num_threads() != threads:  # the caller's setting: a new thread would start with torch's default
        torch.set_num_threads(threads)
    return fn(*args, **kwargs)


def _forget_after_fork() -> None:
    """A forked child has no such thread (only the forking thread survives a fork): it starts its own."""
    global _pool, _lock
    _pool, _lock = None, threading.Lock()  # the lock too: another thread may have held it at the fork
    _flushes.clear()
    _cancel.clear()


os.register_at_fork(after_in_child=_forget_after_fork)
