"""The flushed thread (lowshot/flushed.py): denormals zero there and in its OpenMP workers, not in the caller's
threads; probe fits run on it; the caller's thread count, exceptions, interrupts and forks carry over."""

import multiprocessing
import platform
import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest
import torch

from lowshot import flushed
from lowshot import probe as probe_module
from lowshot.flushed import Cancelled, check_cancelled, run_flushed
from lowshot.probe import LogisticProbe

DENORMAL = 1e-39  # below float32's smallest normal, 1.18e-38


def denormal_product() -> torch.Tensor:
    """A product big enough for every OpenMP worker to take part, each output a sum of denormal x 1 terms: zero
    where the denormals are read as zero (DAZ), about 4e-36 (a normal float) where they are not."""
    p = torch.full((2048, 1024), DENORMAL)
    return p.T @ torch.ones(2048, 256)


def test_denormals_are_zero_on_the_flushed_thread_and_its_workers_not_on_the_callers():
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("FTZ/DAZ are x86 controls; elsewhere torch may not flush")
    assert flushed.flushes()
    on_thread = run_flushed(denormal_product)
    assert (on_thread == 0).all()  # every worker's share: the workers inherited FTZ/DAZ from the thread
    here = denormal_product()
    assert (here > 0).all()  # the caller's floating-point environment is untouched
    assert float(torch.tensor(DENORMAL) * 1.0) > 0


def test_probe_fits_run_on_the_flushed_thread(monkeypatch):
    seen = []
    inner = probe_module._fit_torch

    def recording(*args, **kwargs):
        seen.append(threading.current_thread().name)
        return inner(*args, **kwargs)

    monkeypatch.setattr(probe_module, "_fit_torch", recording)
    rng = np.random.default_rng(0)
    LogisticProbe(0.01).fit(rng.normal(size=(40, 8)).astype(np.float32), np.repeat(np.arange(4), 10))
    assert len(seen) == 1 and seen[0].startswith(flushed.THREAD_NAME)


def test_the_callers_thread_count_and_exceptions_carry_over():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert run_flushed(torch.get_num_threads) == 1
    finally:
        torch.set_num_threads(threads)
    assert run_flushed(torch.get_num_threads) == threads
    with pytest.raises(ZeroDivisionError):
        run_flushed(lambda: 1 / 0)
    assert run_flushed(lambda a, b=0: a + b, 2, b=3) == 5
    assert run_flushed(lambda: run_flushed(lambda: 7)) == 7  # from the thread itself: runs in place


def test_an_interrupted_caller_stops_the_computation_and_the_thread_serves_the_next(monkeypatch):
    outcome = []

    def long_loop():
        deadline = time.monotonic() + 30
        try:
            while time.monotonic() < deadline:
                check_cancelled()
                time.sleep(0.001)
            outcome.append("ran to the end")
        except Cancelled:
            outcome.append("cancelled")
            raise

    real_result = Future.result

    def interrupted(self, timeout=None):  # Ctrl-C while the caller waits
        monkeypatch.setattr(Future, "result", real_result)
        time.sleep(0.05)
        raise KeyboardInterrupt

    monkeypatch.setattr(Future, "result", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_flushed(long_loop)
    assert outcome == ["cancelled"]
    assert run_flushed(lambda: 7) == 7  # the flag is cleared: the next computation runs


def test_the_solver_checks_for_cancellation_every_iteration():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 8)).astype(np.float32), np.repeat(np.arange(4), 10)
    flushed._cancel.set()
    try:
        with pytest.raises(Cancelled):
            LogisticProbe(0.01).fit(x, y)
    finally:
        flushed._cancel.clear()
    assert LogisticProbe(0.01).fit(x, y).n_iter_ > 0


def _fit_in_child(queue) -> None:
    rng = np.random.default_rng(0)
    probe = LogisticProbe(0.01).fit(rng.normal(size=(40, 8)).astype(np.float32), np.repeat(np.arange(4), 10))
    queue.put(probe.coef_.shape)


def test_a_forked_child_starts_its_own_flushed_thread():
    run_flushed(lambda: None)  # the parent's thread exists before the fork
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_fit_in_child, args=(queue,))
    child.start()
    child.join(120)
    assert child.exitcode == 0
    assert queue.get(timeout=5) == (4, 8)
