"""One thread that computes with denormal floats flushed to zero: where the probe's solver runs.

Softmax probabilities far below a row's largest underflow into float32's denormal range (below 1.2e-38), and on x86
an operation that reads or writes a denormal takes a microcode assist, many times the normal cost. Probe fits make
them in numbers, the more the smaller lambda is (MSN ``logistic_eval.py``'s default, 0.00025, more than 0.0025),
and the gradient products over them would then run several times slower.

FTZ and DAZ (flush to zero, denormals are zero: ``torch.set_flush_denormal``) make those values zero instead. They
are per-thread state (MXCSR on x86): set on the caller's thread they would change the floating-point environment of
the caller's own code. So the solver runs on a thread of its own that sets them before its first torch op, and
torch's OpenMP workers, which it starts, compute in the same mode (``tests/test_flushed.py`` checks every worker's
share of a product). The caller's threads, and everything else torch does in the process (extraction included),
keep their floating-point environment; every fit computes in the same mode, whoever calls it.

Fits run one at a time, in the order they are asked for (work on the thread must not wait for another thread's
``run_flushed``: there is one worker). A caller interrupted while it waits (Ctrl-C) withdraws its computation if
it has not started, else sets that computation's own flag, which the solver checks each iteration
(:func:`check_cancelled`): the thread is free again within an iteration, and other callers' fits go on.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import torch

THREAD_NAME = "lowshot-flushed"
WAIT_SLICE = 0.25  # seconds: the caller waits in slices, so that Ctrl-C reaches it on every platform

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_flushes: list[bool] = []  # what torch.set_flush_denormal answered on the thread (False: not supported here)
_local = threading.local()  # on the flushed thread: .flushed, and .cancel, the running call's own flag


class Cancelled(Exception):
    """The caller stopped waiting for this computation (see :func:`check_cancelled`)."""


def run_flushed(fn: Callable[..., Any], /, *args, **kwargs) -> Any:
    """``fn(*args, **kwargs)`` on the flushed thread, with the caller's torch thread count; returns its result or
    raises its exception. Runs ``fn`` in place when called from that thread itself, and once the interpreter is
    shutting down (concurrent.futures then takes no new work; the fit still runs, without the flushing)."""
    if getattr(_local, "flushed", False):
        return fn(*args, **kwargs)
    cancel = threading.Event()  # this call's own: an interrupted caller stops its own computation, no other
    try:
        future = _executor().submit(_call, cancel, torch.get_num_threads(), fn, args, kwargs)
    except RuntimeError:
        return fn(*args, **kwargs)
    try:
        while not wait([future], timeout=WAIT_SLICE).done:
            pass
        return future.result()
    except BaseException:
        if not future.done() and not future.cancel():  # interrupted: withdrawn if still queued, else stopped at
            cancel.set()  # the computation's next check_cancelled()
            wait([future])
        raise


def check_cancelled() -> None:
    """Raise :class:`Cancelled` if the caller waiting for this computation was interrupted (long loops call it;
    off the flushed thread it does nothing)."""
    cancel = getattr(_local, "cancel", None)
    if cancel is not None and cancel.is_set():
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
    _local.flushed = True
    _flushes.append(torch.set_flush_denormal(True))  # before this thread's first parallel op (see above)


def _call(cancel: threading.Event, threads: int, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    _local.cancel = cancel
    try:
        if torch.get_num_threads() != threads:  # the caller's setting: a new thread starts with torch's default
            torch.set_num_threads(threads)
        return fn(*args, **kwargs)
    finally:
        _local.cancel = None


def _forget_after_fork() -> None:
    """A forked child has no such thread (only the forking thread survives a fork): it starts its own."""
    global _pool, _lock
    _pool, _lock = None, threading.Lock()  # the lock too: another thread may have held it at the fork
    _flushes.clear()


os.register_at_fork(after_in_child=_forget_after_fork)
