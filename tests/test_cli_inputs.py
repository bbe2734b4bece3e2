"""Inputs the README promises clean messages for: safetensors headers that are JSON but not a safetensors header
(the tensor at fault named), paths that do not exist and look like hub ids, an adapter given as its
adapter_config.json, and merge with one adapter."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from tests.clitools import LLAMA, LLAMA_TUNED, assert_clean, refused, run
from tests.surgery.validate.broken import clean_adapter, save

F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
HEADERS = {
    "array": ([1, 2, 3], "its header is a JSON array ('[1,2,3]'), not an object of tensor entries"),
    "null": (None, "its header is a JSON null ('null')"),
    "string": ("hello", "its header is a JSON string ('\"hello\"')"),
    "string-offsets": ({"w": {**F32, "data_offsets": ["0", "8"]}},
                       "tensor 'w': data_offsets ['0', '8'] are not two non-negative integers"),
    "entry-not-object": ({"w": [0, 8]}, "tensor 'w': its entry is [0, 8], not an object"),
    "size-mismatch": ({"w": {**F32, "shape": [2, 2]}},
                      "tensor 'w': shape [2, 2] in F32 takes 16 bytes but its data_offsets [0, 8] span 8"),
    "overlap": ({"a": F32, "b": {**F32, "data_offsets": [4, 12]}},
                "tensor 'b' starts at data byte 4 but the previous tensor 'a' ends at byte 8"),
    "unknown-dtype": ({"w": {**F32, "dtype": "Q9"}}, "tensor 'w': dtype 'Q9' is not a safetensors dtype"),
    "metadata": ({"__metadata__": {"format": 1}, "w": F32},
                 "its __metadata__ is {\"format\": 1}, not an object of strings"),
}


def _write(path: Path, header: object, data: bytes = b"\0" * 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("case", sorted(HEADERS))
def test_a_bad_header_in_a_checkpoint_is_one_message(tmp_path, case):
    header, expected = HEADERS[case]
    base = _write(tmp_path / "base" / "model.safetensors", header).parent
    adapter = save(clean_adapter(r=2), tmp_path / "adapter")
    for argv in (["extract", base, LLAMA_TUNED, "--r", "2"], ["fuse", base, adapter]):
        refused(run(*argv, "-o", tmp_path / "out"), f"{base / 'model.safetensors'} is not a readable safetensors",
                expected)
    assert not (tmp_path / "out").exists()
    assert_clean(tmp_path)


@pytest.mark.parametrize("case", sorted(HEADERS))
def test_a_bad_header_in_an_adapter(tmp_path, case):
    header, expected = HEADERS[case]
    adapter = save(clean_adapter(r=2), tmp_path / "adapter")
    _write(adapter / "adapter_model.safetensors", header)
    refused(run("inspect", adapter), expected)
    result = run("validate", adapter, "--json")
    assert result.exit_code == 1 and "Traceback" not in result.stderr, result.output
    found = {f["code"]: f for f in json.loads(result.stdout)["findings"]}
    assert expected in found["file-unreadable"]["message"]


# ------------------------------------------------------------------------------------------------ paths


def test_a_missing_path_under_a_local_directory_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    import huggingface_hub

    asked = []
    real = huggingface_hub.snapshot_download

    def recording(*args, **kwargs):
        asked.append(kwargs.get("local_files_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording)
    for argv in (["inspect", "out/nope"], ["extract", "out/nope", LLAMA, "--r", "2", "-o", "out/x"]):
        message = refused(run(*argv), "out/nope does not exist: out has no nope")
        assert message.count("\n") == 1
    assert asked and all(asked)  # only the local cache was asked, never the network


def test_a_missing_hub_like_name_while_offline_says_it_does_not_exist_first(tmp_path, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    message = refused(run("inspect", "someone/nothing-here"), "someone/nothing-here does not exist as a local path",
                      "HF_HUB_OFFLINE=1 is set")
    assert message.count("\n") == 1


def test_an_adapter_given_as_its_config_file(tmp_path):
    adapter = save(clean_adapter(r=2), tmp_path / "adapter")
    config = adapter / "adapter_config.json"
    inspected = run("inspect", config, "--json")
    assert inspected.exit_code == 0, inspected.output
    assert len(json.loads(inspected.stdout)["modules"]) == 4
    result = run("rerank", config, "--r", "1", "-o", tmp_path / "r1")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r1" / "adapter_model.safetensors").is_file()


def test_merge_of_one_adapter_scales_it(tmp_path):
    adapter = save(clean_adapter(r=2), tmp_path / "adapter")
    result = run("merge", adapter, "--weights", "0.5", "--method", "cat", "--json", "-o", tmp_path / "half")
    assert result.exit_code == 0, result.output
    from tests.test_cli_numbers import _deltas

    original, half = _deltas(adapter), _deltas(tmp_path / "half")
    for name, delta in half.items():
        assert (delta - 0.5 * original[name]).abs().max() < 1e-6, name
    assert "A [B ...]" in run("merge", "--help").stdout
    refused(run("merge", adapter, "--method", "ties", "--density", "0.5", "-o", tmp_path / "ties"),
            "needs at least two adapters")


def test_an_unwritable_input_copy_does_not_leave_a_probe(tmp_path):
    """The probe that checks an output's place before any work is removed again."""
    shutil.copytree(LLAMA, tmp_path / "base")
    result = run("fuse", tmp_path / "base", save(clean_adapter(r=2), tmp_path / "adapter"), "-o", tmp_path / "x")
    assert result.exit_code == 0, result.output
    assert_clean(tmp_path)
