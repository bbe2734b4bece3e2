"""One size grammar (lorasurg.io.sizes) behind max_shard_size and --max-memory, each with its own rules on top."""

from __future__ import annotations

import pytest

from lorasurg.errors import ConfigError, InputError
from lorasurg.io.sizes import split_size
from lorasurg.io.writer import parse_size as shard_size
from lorasurg.surgery.budget import parse_size as memory_size


@pytest.mark.parametrize("text, expected", [
    ("123456", (123456.0, "")), ("1.5 GiB", (1.5, "GiB")), (".5GB", (0.5, "GB")), ("50%", (50.0, "%")),
    (" 2g ", (2.0, "g")), ("5 parsecs", None), ("GB", None), ("-1MB", None), ("1e3", None),
])
def test_split_size(text, expected):
    assert split_size(text) == expected


@pytest.mark.parametrize("text, nbytes", [("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), ("1.5G", 1_500_000_000),
                                          ("1024", 1024), ("1 kib", 1024)])
def test_both_options_read_bytes_alike(text, nbytes):
    assert shard_size(text) == memory_size(text) == nbytes


def test_each_option_keeps_its_own_rules():
    assert shard_size("8Gb") == 10**9  # transformers' max_shard_size: a lower-case b is bits
    assert memory_size("50%", available=10**9) == 5 * 10**8
    with pytest.raises(InputError, match="shard size '50%' is not a size"):
        shard_size("50%")
    with pytest.raises(ConfigError, match="accepted forms"):
        memory_size("lots")
