"""Overlap: two computations at once where torch leaves a core free, one after the other elsewhere."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from daemon.engine.overlap import Overlap, usable_cores

needs_two_cores = pytest.mark.skipif(usable_cores() < 2, reason="overlap needs a core torch does not use")


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _where() -> str:
    return threading.current_thread().name


@needs_two_cores
def test_with_a_core_free_the_second_runs_in_a_worker_at_the_same_time(torch_threads):
    torch_threads(1)
    overlap = Overlap(torch.device("cpu"))
    assert overlap.available()
    started = threading.Event()

    def second():
        started.set()
        return _where(), torch.get_num_threads()

    def first():   # finishes only once the second has started: the two run at once
        assert started.wait(5)
        return _where()

    (caller, (worker, worker_threads)) = overlap.both(first, second)
    assert caller == threading.current_thread().name and worker != caller
    assert worker_threads == 1   # the caller's torch thread count


def test_where_torch_uses_every_core_the_two_run_in_order_in_the_caller(torch_threads):
    torch_threads(usable_cores())
    overlap = Overlap(torch.device("cpu"))
    assert not overlap.available()
    order = []
    assert overlap.both(lambda: order.append(1) or _where(), lambda: order.append(2) or _where()) == (
        threading.current_thread().name, threading.current_thread().name)
    assert order == [1, 2]


def test_a_gpu_never_overlaps(torch_threads):
    torch_threads(1)
    assert not Overlap(torch.device("cuda")).available()


@needs_two_cores
def test_an_error_in_the_first_propagates_after_the_second_has_finished(torch_threads):
    torch_threads(1)
    finished = threading.Event()

    def second():
        time.sleep(0.2)
        finished.set()

    def first():
        raise ValueError("first failed")

    with pytest.raises(ValueError, match="first failed"):
        Overlap(torch.device("cpu")).both(first, second)
    assert finished.is_set()


@needs_two_cores
def test_an_error_in_the_second_propagates(torch_threads):
    torch_threads(1)

    def second():
        raise KeyError("second failed")

    with pytest.raises(KeyError, match="second failed"):
        Overlap(torch.device("cpu")).both(lambda: 1, second)
