"""``io/atomic``'s temporaries: named after their writer, and removed by a later write only when that writer is a
process of this host that is gone."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

from lorasurg.errors import LorasurgWarning
from lorasurg.io import atomic
from lorasurg.io.writer import atomic_output_dir, atomic_output_file


@pytest.fixture
def dead_pid() -> int:
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


@pytest.mark.parametrize("host", ["vm", "my-build-host.example.org"])
def test_only_temporaries_of_gone_processes_of_this_host_are_removed(tmp_path, monkeypatch, dead_pid, host):
    monkeypatch.setattr(atomic.socket, "gethostname", lambda: host)
    stale = tmp_path / f".out.tmp-{dead_pid}-{host}-0123abcd"
    stale_old = tmp_path / f".out.old-{dead_pid}-{host}-4567cdef"
    other_host = tmp_path / f".out.tmp-{dead_pid}-elsewhere-89abcdef"
    live = tmp_path / f".out.tmp-1-{host}-deadbeef"  # pid 1 always runs
    other_output = tmp_path / f".other.tmp-{dead_pid}-{host}-01234567"
    for path in (stale, stale_old, other_host, live, other_output):
        path.mkdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with atomic_output_dir(tmp_path / "out") as tmp:
            assert tmp.name.startswith(f".out.tmp-{atomic.os.getpid()}-{host}-")
    assert not stale.exists() and not stale_old.exists()
    assert other_host.is_dir() and live.is_dir() and other_output.is_dir()
    [warning] = [w for w in caught if issubclass(w.category, LorasurgWarning)]
    assert "removed 2 temporary output(s)" in str(warning.message)


def test_a_stale_temporary_file_is_removed_too(tmp_path, dead_pid):
    stale = tmp_path / f".plot.png.tmp-{dead_pid}-{atomic._host()}-0123abcd"
    stale.write_bytes(b"half a png")
    with pytest.warns(LorasurgWarning, match=stale.name):
        with atomic_output_file(tmp_path / "plot.png") as tmp:
            tmp.write_bytes(b"png")
    assert not stale.exists() and (tmp_path / "plot.png").read_bytes() == b"png"
