"""The flushed thread (lowshot/classify/flushed.py): denormals zero there and in its OpenMP workers, not in the caller's
threads; probe fits run on it; the caller's thread count, exceptions, interrupts and forks carry over."""

import multiprocessing
import platform
import threading
import time

import numpy as np
import pytest
import torch

from lowshot.classify import flushed, logistic, solver
from lowshot.classify.flushed import Cancelled, check_cancelled, run_flushed
from lowshot.classify.logistic import LogisticProbe

DENORMAL = 1e-39  # below float32's smallest normal, 1.18e-38


def denormal_product() -> torch.Tensor:
    """A product big enough for every OpenMP worker to take part, each output a sum of denormal x 1 terms: zero
    where the denormals are read as zero (DAZ), about 2e-36 (a normal float) where they are not."""
    p = torch.full((2048, 1024), DENORMAL)
    return p.T @ torch.ones(2048, 256)


@pytest.fixture
def two_threads():
    """At least two torch threads, so that OpenMP workers take part (the caller's count is the thread's)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    yield
    torch.set_num_threads(threads)


def test_denormals_are_zero_on_the_flushed_thread_and_its_workers_not_on_the_callers(two_threads):
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("FTZ/DAZ are x86 controls; elsewhere torch may not flush")
    assert flushed.flushes()
    on_thread = run_flushed(denormal_product)
    assert (on_thread == 0).all()  # every worker's share
    here = denormal_product()
    assert (here > 0).all()  # the caller's floating-point environment is untouched
    assert float(torch.tensor(DENORMAL) * 1.0) > 0


def small_problem() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(40, 8)).astype(np.float32), np.repeat(np.arange(4), 10)


def test_probe_fits_run_on_the_flushed_thread(monkeypatch):
    seen = []
    inner = logistic.fit_torch

    def recording(*args, **kwargs):
        seen.append(threading.current_thread().name)
        return inner(*args, **kwargs)

    monkeypatch.setattr(logistic, "fit_torch", recording)
    LogisticProbe(0.01).fit(*small_problem())
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
    with pytest.raises(TimeoutError):  # the function's own, not mistaken for a wait's
        run_flushed(lambda: (_ for _ in ()).throw(TimeoutError("its own")))
    assert run_flushed(lambda a, b=0: a + b, 2, b=3) == 5
    assert run_flushed(lambda: run_flushed(lambda: 7)) == 7  # from the thread itself: runs in place


def loop(outcome: list, seconds: float):
    """Check for cancellation every millisecond for ``seconds``; record how it ended."""
    def run():
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                check_cancelled()
                time.sleep(0.001)
            outcome.append("ran to the end")
        except Cancelled:
            outcome.append("cancelled")
            raise
    return run


def interrupt_the_wait(monkeypatch, after: float) -> None:
    """Ctrl-C in the caller ``after`` seconds into its first wait (later waits are the real ones)."""
    real_wait = flushed.wait

    def interrupted(futures, timeout=None):
        monkeypatch.setattr(flushed, "wait", real_wait)
        time.sleep(after)
        raise KeyboardInterrupt

    monkeypatch.setattr(flushed, "wait", interrupted)


def test_an_interrupted_caller_stops_its_computation_and_the_next_one_runs(monkeypatch):
    outcome = []
    interrupt_the_wait(monkeypatch, 0.05)
    with pytest.raises(KeyboardInterrupt):
        run_flushed(loop(outcome, 30))
    assert outcome == ["cancelled"]
    assert LogisticProbe(0.01).fit(*small_problem()).n_iter_ > 0  # no flag left behind for the next fit


def test_an_interrupted_caller_withdraws_its_queued_work_and_leaves_other_callers_fits_alone(monkeypatch):
    theirs, mine = [], []
    other = threading.Thread(target=lambda: run_flushed(loop(theirs, 0.5)))
    other.start()
    while not theirs and not any(t.name.startswith(flushed.THREAD_NAME) for t in threading.enumerate()):
        time.sleep(0.001)
    time.sleep(0.05)  # the other caller's loop is running on the thread
    interrupt_the_wait(monkeypatch, 0.0)
    with pytest.raises(KeyboardInterrupt):
        run_flushed(loop(mine, 30))
    other.join(30)
    assert theirs == ["ran to the end"]  # not cancelled by my interrupt
    assert mine == []  # mine was still queued: withdrawn, never run


def test_the_solver_checks_for_cancellation_once_per_iteration(monkeypatch):
    calls = []

    def counting(stop_at: int | None = None):
        def check():
            calls.append(1)
            if stop_at is not None and len(calls) >= stop_at:
                raise Cancelled("interrupted by the caller")
        return check

    monkeypatch.setattr(solver, "check_cancelled", counting())
    probe = LogisticProbe(0.01).fit(*small_problem())
    assert probe.n_iter_ > 3 and len(calls) == probe.n_iter_
    calls.clear()
    monkeypatch.setattr(solver, "check_cancelled", counting(stop_at=3))
    with pytest.raises(Cancelled):
        LogisticProbe(0.01).fit(*small_problem())
    assert len(calls) == 3  # stopped at the third iteration's check


def _fit_in_child(queue) -> None:
    """Every torch op of the child on the flushed thread: a parallel op on a forked child's main thread hangs in
    GNU OpenMP once the parent's main thread has run one (torch's, not lowshot's; a new thread's team is fine)."""
    probe = LogisticProbe(0.01).fit(*small_problem())
    zero = run_flushed(lambda: bool((denormal_product() == 0).all()))
    queue.put((probe.coef_.shape, flushed.flushes(), zero))


def test_a_forked_child_starts_its_own_flushed_thread(two_threads):
    run_flushed(denormal_product)  # the parent's thread and its OpenMP workers exist before the fork
    denormal_product()  # and the parent's main thread has run a parallel op
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_fit_in_child, args=(queue,), daemon=True)
    child.start()
    try:
        shape, flushes, zero = queue.get(timeout=120)
        child.join(30)
    finally:
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0 and shape == (4, 8)
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert flushes and zero
