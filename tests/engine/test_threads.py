"""Small factorizations run on one thread; the caller's setting comes back afterwards, also after an error."""

from __future__ import annotations

import pytest
import torch

from lorasurg.engine.threads import SMALL_WORK, threads_for


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_small_work_runs_on_one_thread(two_threads):
    with threads_for(1000):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with threads_for(SMALL_WORK):
        assert torch.get_num_threads() == 2


def test_setting_restored_after_an_error(two_threads):
    with pytest.raises(RuntimeError):
        with threads_for(10):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == 2


def test_one_thread_whatever_the_size(two_threads):
    from lorasurg.engine.threads import one_thread

    with one_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
