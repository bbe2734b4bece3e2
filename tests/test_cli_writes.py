"""Writing outputs from the command line: places nothing can be created in, a full disk, the file-size limit,
file modes, SIGTERM and Ctrl-C, and the temporaries a killed run leaves. Every refusal is one ``error:`` message
naming the output and the file, exit 2, and nothing is left on disk."""

from __future__ import annotations

import errno
import glob
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lorasurg
from lorasurg.io import atomic as atomic_module
from lorasurg.io import writer as writer_module
from tests.clitools import (
    LLAMA, LLAMA_TUNED, PISSA, ROOT, assert_clean, assert_finite, assert_modes, refused, run, umask,
)
from tests.surgery.validate.broken import clean_adapter, save


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("adapter") / "a"
    save(clean_adapter(r=4), path)
    return path


def _writers(adapter: Path) -> dict[str, list]:
    """Every command that writes, as typed, without its output (``-o OUT`` or ``--plot OUT`` is appended)."""
    return {
        "extract": ["extract", LLAMA, LLAMA_TUNED, "--r", "8", "-o"],
        "rerank": ["rerank", adapter, "--r", "2", "-o"],
        "merge": ["merge", adapter, adapter, "-o"],
        "convert": ["convert", PISSA / "trained", "--initial", PISSA / "adapter", "-o"],
        "residualize": ["residualize", LLAMA, "--r", "2", "--target-modules", "q_proj", "-o"],
        "fuse": ["fuse", LLAMA, adapter, "-o"],
        "validate --fix": ["validate", adapter, "--fix", "-o"],
        "inspect --plot": ["inspect", adapter, "--plot"],
        "export": ["export", adapter, "--to", "gguf", "--base", LLAMA, "-o"],
    }


COMMANDS = ["extract", "rerank", "merge", "convert", "residualize", "fuse", "validate --fix", "inspect --plot",
            "export"]


def _out(command: str, where: Path) -> Path:
    return where / {"inspect --plot": "out.png", "export": "out.gguf"}.get(command, "out")


# ------------------------------------------------------------------------------------------------ where nothing goes


@pytest.mark.parametrize("command", COMMANDS)
def test_output_under_a_file_is_refused_before_any_work(adapter, tmp_path, command):
    (tmp_path / "afile.txt").write_text("x")
    out = _out(command, tmp_path / "afile.txt" / "sub")
    refused(run(*_writers(adapter)[command], out), f"cannot write {out}", f"{tmp_path / 'afile.txt'} is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile.txt"]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc and /sys")
@pytest.mark.parametrize("place", ["/proc", "/sys"])
@pytest.mark.parametrize("command", ["rerank", "fuse", "validate --fix", "inspect --plot", "export"])
def test_output_under_proc_or_sys_is_refused(adapter, place, command):
    out = _out(command, Path(place) / "lorasurg-test")
    refused(run(*_writers(adapter)[command], out), f"cannot write {out}", f"nothing can be created in {place}")


# ------------------------------------------------------------------------------------------------ disk full, size limit


@pytest.mark.parametrize("command", ["extract", "rerank", "fuse", "residualize"])
def test_not_enough_space_is_refused_with_what_is_needed_and_free(adapter, tmp_path, monkeypatch, command):
    free = 500
    monkeypatch.setattr(atomic_module.shutil, "disk_usage", lambda path: type("U", (), {"free": free})())
    out = _out(command, tmp_path)
    message = refused(run(*_writers(adapter)[command], out), "not enough space for", "it needs", "500 B are free")
    assert str(out) in message
    assert not out.exists()
    assert_clean(tmp_path)


def test_a_disk_that_fills_while_writing_names_the_file(adapter, tmp_path, monkeypatch):
    def full(src: int, dst: int, offset: int, count: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer_module, "_copy_range", full)
    out = tmp_path / "fused"
    refused(run("fuse", LLAMA, adapter, "-o", out), f"cannot write {out} (writing .model-00001.part)",
            "no space left on the device", "free there now")
    assert list(tmp_path.iterdir()) == []


def _limited(limit: int):
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return preexec


@pytest.mark.parametrize("command, needle", [
    ("fuse", "its largest file needs"),  # refused before writing: the rewrite knows its shard sizes
    ("extract", "its largest file needs"),
    ("inspect --plot", "(ulimit -f); the partial output was removed"),  # a PNG's size is known only once drawn
])
def test_file_size_limit(adapter, tmp_path, command, needle):
    out = _out(command, tmp_path)
    argv = [sys.executable, "-m", "lorasurg.cli", *map(str, _writers(adapter)[command]), str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, preexec_fn=_limited(40_000), cwd=ROOT)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr
    assert needle in done.stderr and "file-size limit of 40.0 KB" in done.stderr, done.stderr
    assert not out.exists()
    assert_clean(tmp_path)


# ------------------------------------------------------------------------------------------------ modes


@pytest.mark.parametrize("command", COMMANDS)
def test_every_file_written_gets_the_umask_mode(adapter, tmp_path, command):
    out = _out(command, tmp_path)
    with umask(0o022):
        result = run(*_writers(adapter)[command], out)
    assert result.exit_code in (0, 1), result.output  # validate --fix: 1 when the copy still has errors
    assert_modes(out)
    if out.is_dir():
        assert_finite(out)
    assert_clean(tmp_path)


def test_modes_follow_another_umask_and_the_library(tmp_path):
    with umask(0o027):
        assert run("rerank", _saved(tmp_path / "a"), "--r", "2", "-o", tmp_path / "out").exit_code == 0
    assert_modes(tmp_path / "out", 0o640, 0o750)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    lorasurg.inject(model, lorasurg.LoraConfig(r=2, target_modules=["0"]))
    with umask(0o022):
        lorasurg.save_adapter(model, str(tmp_path / "saved"))
    assert_modes(tmp_path / "saved")


def _saved(path: Path) -> Path:
    with umask(0o077):  # an input written under a strict umask does not change the output's modes
        return save(clean_adapter(r=4), path)


# ------------------------------------------------------------------------------------------------ signals


def _big_checkpoint(root: Path) -> tuple[Path, Path]:
    """A Llama-shaped checkpoint of ~50 MB (zeros: quick to make, slow enough to write) and an adapter on its q_proj."""
    import json

    base = root / "base"
    base.mkdir()
    config = json.loads((Path(LLAMA) / "config.json").read_text())
    hidden, inter, layers, vocab = 512, 2048, 2, 8192
    config.update(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, vocab_size=vocab,
                  tie_word_embeddings=False)
    (base / "config.json").write_text(json.dumps(config))
    kv = hidden // config["num_attention_heads"] * config["num_key_value_heads"]
    state = {"model.embed_tokens.weight": torch.zeros(vocab, hidden), "lm_head.weight": torch.zeros(vocab, hidden),
             "model.norm.weight": torch.ones(hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden),
                  "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, hidden),
                  "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
        state.update({f"{p}{name}.weight": torch.zeros(shape) for name, shape in shapes.items()})
        state.update({f"{p}input_layernorm.weight": torch.ones(hidden),
                      f"{p}post_attention_layernorm.weight": torch.ones(hidden)})
    save_file(state, str(base / "model.safetensors"), metadata={"format": "pt"})
    modules = {f"model.layers.{i}.self_attn.q_proj": lorasurg.AdapterModule(
        f"model.layers.{i}.self_attn.q_proj", torch.ones(2, hidden), torch.ones(hidden, 2)) for i in range(layers)}
    lorasurg.Adapter(lorasurg.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]), modules).save(root / "adapter")
    return base, root / "adapter"


def test_sigterm_mid_write_cleans_up_and_a_later_run_removes_what_sigkill_left(tmp_path):
    base, adapter = _big_checkpoint(tmp_path)
    out = tmp_path / "fused"
    fuse = [sys.executable, "-m", "lorasurg.cli", "fuse", str(base), str(adapter), "-o", str(out)]
    process = subprocess.Popen(fuse, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    while not glob.glob(str(tmp_path / ".fused.tmp-*" / ".model.spool")):  # the write has started
        assert process.poll() is None, process.communicate()
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert stderr == "terminated: nothing was written\n" and stdout == ""
    assert not out.exists()
    assert_clean(tmp_path)

    # what SIGKILL or a power loss leaves: a temporary of a process that is gone (and one of a live process)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f".fused.tmp-{dead.pid}-{host}-0123abcd"
    (stale / "model").mkdir(parents=True)
    (stale / ".model.spool").write_bytes(b"\0" * 1024)
    live = tmp_path / f".fused.tmp-{os.getpid()}-{host}-89abcdef"
    live.mkdir()
    result = run("fuse", base, adapter, "-o", out)
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: removed 1 temporary output(s) next to "), lines
    assert f"{stale.name} (process {dead.pid})" in lines[0]
    assert not stale.exists() and live.is_dir() and (out / "model.safetensors").is_file()


def test_sigterm_in_process_is_handled_as_ctrl_c(adapter, tmp_path, monkeypatch):
    real = writer_module.ShardedWriter.add

    def add(self, name, tensor):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the adapter's file is being written
        return real(self, name, tensor)

    monkeypatch.setattr(writer_module.ShardedWriter, "add", add)
    before = signal.getsignal(signal.SIGTERM)
    result = run("rerank", adapter, "--r", "2", "-o", tmp_path / "out")
    assert result.exit_code == 143 and result.stderr == "terminated: nothing was written\n", result.output
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == before  # the command put the previous handler back


_INTERRUPT_AT_IMPORT = """
import importlib.abc, os, signal, sys
class Interrupt(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch":
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while lorasurg imports torch
        return None
sys.meta_path.insert(0, Interrupt())
sys.argv = ["lorasurg", "--version"]
from lorasurg.cli import run
run()
"""

_INTERRUPT_AT_EXIT = """
import atexit, os, signal, sys, time
from lorasurg.cli import run
atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.2)))  # Ctrl-C during shutdown
sys.argv = ["lorasurg", "--version"]
run()
"""


def test_ctrl_c_during_start_up_prints_one_line():
    done = subprocess.run([sys.executable, "-c", _INTERRUPT_AT_IMPORT], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode in (-signal.SIGINT, 130), done
    assert done.stderr == "interrupted while starting: nothing was written\n" and done.stdout == ""


def test_ctrl_c_while_the_interpreter_exits_prints_nothing():
    done = subprocess.run([sys.executable, "-c", _INTERRUPT_AT_EXIT], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and done.stderr == "", done
    assert done.stdout.startswith("lorasurg, version")
