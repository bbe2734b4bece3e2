"""``lorasurg.surgery.budget``: sizes, the default, hold-or-stream decisions and the smallest workable budget."""

from __future__ import annotations

import pytest

from lorasurg.errors import ConfigError
from lorasurg.surgery import budget as budget_mod
from lorasurg.surgery.budget import SIZE_FORMS, MemoryBudget, WholeProcess, parse_size


@pytest.mark.parametrize("text, expected", [
    ("123456", 123456),
    (4096, 4096),
    ("500MB", 500 * 10**6),
    ("2GB", 2 * 10**9),
    ("2G", 2 * 10**9),
    ("1.5GiB", int(1.5 * 2**30)),
    ("512 mib", 512 * 2**20),
    ("64kB", 64_000),
    (" 3 TB ", 3 * 10**12),
    ("0.5%", 5_000),
    ("100%", 1_000_000),
])
def test_parse_size_accepted_forms(text, expected):
    assert parse_size(text, available=1_000_000) == expected


@pytest.mark.parametrize("text, message", [
    ("abc", "is not a size; accepted forms: "),
    ("12XB", "is not a size; accepted forms: "),
    ("", "is not a size"),
    ("-5MB", "is not a size"),
    ("1.2.3GB", "is not a size"),
    ("0", "must be a positive size"),
    ("0.1B", "must be a positive size"),
    ("150%", "a percentage must be above 0 and at most 100"),
    ("0%", "a percentage must be above 0 and at most 100"),
    (True, "must be a size"),
])
def test_parse_size_bad_input_says_the_accepted_forms(text, message):
    with pytest.raises(ConfigError) as info:
        parse_size(text, available=10**9)
    assert message in str(info.value)
    if "not a size" in message:
        assert SIZE_FORMS in str(info.value) and "--max-memory" in str(info.value)


def test_default_is_half_the_available_memory(monkeypatch):
    monkeypatch.setattr(budget_mod, "available_memory", lambda device=None: 8 * 10**9)
    budget = MemoryBudget.resolve(None, "cpu")
    assert budget.total == budget.limit == 4 * 10**9 and budget.in_use == 0
    assert budget.description == "default: 50% of the 8.0 GB available"


def test_whole_process_size_counts_what_the_process_holds(monkeypatch):
    monkeypatch.setattr(budget_mod, "resident_memory", lambda: 250 * 10**6)
    budget = MemoryBudget.resolve(WholeProcess("400MB"), "cpu")
    assert (budget.total, budget.in_use, budget.limit) == (400 * 10**6, 250 * 10**6, 150 * 10**6)
    assert "whole process, 250 MB of it in use" in budget.description
    library = MemoryBudget.resolve("400MB", "cpu")  # the library's max_memory: the operation's tensors only
    assert (library.total, library.in_use, library.limit) == (400 * 10**6, 0, 400 * 10**6)
    assert MemoryBudget.resolve(WholeProcess(None), "cpu").in_use == 0  # the default is for tensors


def test_resident_memory_is_read():
    assert budget_mod.resident_memory() > 10**6  # this Python process, with torch loaded


def test_place_holds_what_fits_and_streams_the_rest_in_the_largest_blocks():
    budget = MemoryBudget(10_000, "test")
    held = budget.place("small", hold_bytes=9_000, row_bytes=100, fixed_bytes=1_000, rows=50, reserved=1_000,
                        max_block_rows=20)
    assert held.hold and held.block_rows == 20 and "within the budget" in held.reason
    streamed = budget.place("big", hold_bytes=9_001, row_bytes=100, fixed_bytes=1_000, rows=500, reserved=1_000,
                            max_block_rows=200)
    assert not streamed.hold and streamed.block_rows == 80  # (10000 - 1000 reserved - 1000 fixed) // 100
    assert streamed.stream_bytes == 9_000 and "above the 9.0 KB left in the budget" in streamed.reason
    capped = budget.place("big", hold_bytes=10**6, row_bytes=10, fixed_bytes=0, rows=500, max_block_rows=64)
    assert not capped.hold and capped.block_rows == 64
    whole = budget.place("exact", hold_bytes=10**6, row_bytes=10, fixed_bytes=0, rows=5, can_stream=False,
                         cannot_stream_reason="needs the whole matrix")
    assert whole.hold and whole.over_budget and "needs the whole matrix" in whole.reason


def test_require_names_the_smallest_workable_budget_and_it_works():
    budget = MemoryBudget(1_000, "--max-memory 1KB")
    needs = [("a.weight", 1_234_567, "one row and the SVD"), ("b.weight", 10, "little")]
    with pytest.raises(ConfigError) as info:
        budget.require(needs)
    message = str(info.value)
    assert "(--max-memory 1KB) is below the smallest workable budget for this input, 1.3MB" in message
    assert "a.weight needs one row and the SVD" in message and "Use --max-memory 1.3MB or more" in message
    MemoryBudget(parse_size("1.3MB"), "ok").require(needs)
    MemoryBudget(1_234_567, "exact").require(needs)
    with pytest.raises(ConfigError):
        MemoryBudget(1_234_566, "one byte short").require(needs)


def test_require_adds_what_the_process_already_holds():
    budget = MemoryBudget(300 * 10**6, "--max-memory 300MB for the whole process", in_use=280 * 10**6)
    with pytest.raises(ConfigError) as info:
        budget.require([("e.weight", 50 * 10**6, "a row block")])
    assert "smallest workable budget for this input, 330MB" in str(info.value)
    assert "280 MB the process already holds (Python, torch)" in str(info.value)
