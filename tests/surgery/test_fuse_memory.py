"""``fuse`` under a memory budget: row blocks give the same model, copies stay bit-identical, bad budgets refused."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lorasurg.cli import main
from lorasurg.config import LoraConfig
from lorasurg.errors import ConfigError
from lorasurg.io.adapter import Adapter, AdapterModule
from lorasurg.io.checkpoint import Checkpoint
from lorasurg.surgery.budget import SIZE_FORMS, parse_size
from lorasurg.surgery.extract import extract_to_dir
from lorasurg.surgery.fuse import fuse
from tests.conftest import tol

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
LLAMA = FIXTURES / "tiny-llama" / "base"
Q = "model.layers.0.self_attn.q_proj"
EMBED = "model.embed_tokens"


def _smallest(base, adapter, tmp_path: Path, **kwargs) -> str:
    """The smallest workable budget the refusal of a 1 KB budget names (nothing written)."""
    with pytest.raises(ConfigError) as info:
        fuse(base, adapter, tmp_path / "refused", max_memory="1KB", **kwargs)
    assert not (tmp_path / "refused").exists()
    return re.search(r"Use --max-memory (\S+) or more", str(info.value)).group(1)


def _dora(gen) -> Adapter:
    """DoRA on a linear layer (norms per stored row) and on the embedding (norms across every stored row)."""
    mods = {
        Q: AdapterModule(Q, torch.randn(4, 64, generator=gen), torch.randn(64, 4, generator=gen),
                         magnitude=torch.rand(64, generator=gen) + 0.5),
        EMBED: AdapterModule(EMBED, torch.randn(4, 256, generator=gen), torch.randn(64, 4, generator=gen),
                             magnitude=torch.rand(64, generator=gen) + 0.5, embedding=True),
    }
    return Adapter(LoraConfig(r=4, lora_alpha=8, target_modules=[Q, EMBED], use_dora=True), mods)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Extracted adapters: Llama (linear, embedding and tied output-head LoRA, a saved norm), GPT-2 (Conv1D,
    fan_in_fan_out)."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for name in ("llama", "gpt2"):
        base, tuned = FIXTURES / f"tiny-{name}" / "base", FIXTURES / f"tiny-{name}" / "tuned"
        extract_to_dir(base, tuned, root / name, r=4)
        out[name] = (base, root / name)
    return out


@pytest.mark.parametrize("case", ["llama", "gpt2", "dora"])
def test_row_blocks_give_the_model_the_default_budget_gives(tmp_path, gen, extracted, case):
    base, adapter = (LLAMA, _dora(gen)) if case == "dora" else extracted[case]
    held = fuse(base, adapter, tmp_path / "held")
    assert held.memory.blocked == [] and "every tensor processed whole" in held.render()
    smallest = _smallest(base, adapter, tmp_path)
    blocked = fuse(base, adapter, tmp_path / "blocked", max_memory=smallest)
    merged = {t.name for t in blocked.memory.blocked if t.what == "merged"}
    assert {f"{Q}.weight" if case == "dora" else "model.embed_tokens.weight" if case == "llama" else
            "transformer.h.0.attn.c_attn.weight"} <= merged, merged
    if case == "dora":
        assert f"{EMBED}.weight" in merged  # DoRA norms across every stored row: two passes over the blocks
    assert all(t.block_rows < t.shape[0] for t in blocked.memory.blocked)
    assert all("above the" in t.reason and "budget" in t.reason for t in blocked.memory.blocked)
    text = blocked.render()
    assert blocked.memory.budget == f"--max-memory {smallest}"
    assert "tensor(s) processed in row blocks, because processing them whole needs more than" in text
    assert all(name in text for name in merged)
    assert {t["name"] for t in blocked.to_dict()["memory"]["row_blocks"]} == {t.name for t in blocked.memory.blocked}
    with Checkpoint.open(tmp_path / "held") as h, Checkpoint.open(tmp_path / "blocked") as b:
        assert h.names() == b.names()
        for name in h.names():
            got, want = b.get(name), h.get(name)
            if name in merged:
                # the same float32 arithmetic grouped by blocks: within float32 rounding (rtol 1e-5, atol 1e-6)
                torch.testing.assert_close(got, want, **tol(torch.float32))
            else:
                assert torch.equal(got, want), name
    assert json.loads((tmp_path / "held" / "config.json").read_text()) == \
        json.loads((tmp_path / "blocked" / "config.json").read_text())


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_copied_tensors_are_bit_identical_whatever_the_budget(tmp_path, gen, dtype):
    mods = {Q: AdapterModule(Q, torch.randn(2, 64, generator=gen), torch.randn(64, 2, generator=gen))}
    adapter = Adapter(LoraConfig(r=2, lora_alpha=4, target_modules=[Q]), mods)
    reports = {budget: fuse(LLAMA, adapter, tmp_path / budget, max_memory=None if budget == "default" else budget,
                            dtype=dtype) for budget in ("default", "40KB")}
    copied = {t.name for t in reports["40KB"].memory.blocked if t.what == "copied"}
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= copied  # 64 KB each: above the budget
    assert f"{Q}.weight" in {t.name for t in reports["40KB"].memory.blocked if t.what == "merged"}
    with Checkpoint.open(LLAMA) as base, Checkpoint.open(tmp_path / "default") as d, \
            Checkpoint.open(tmp_path / "40KB") as small:
        for name in base.names():
            if name == f"{Q}.weight":
                continue
            assert torch.equal(small.get(name), d.get(name)), name
            if dtype == "auto":
                assert torch.equal(small.get(name), base.get(name)), name


def test_budget_below_one_row_is_refused_with_the_smallest_workable_budget(tmp_path, gen, extracted):
    base, adapter = extracted["llama"]
    with pytest.raises(ConfigError) as info:
        fuse(base, adapter, tmp_path / "out", max_memory="1KB")
    message = str(info.value)
    assert "the memory budget (--max-memory 1KB) is below the smallest workable budget for this input" in message
    assert "needs one row of" in message and "reserved for the adapter" in message
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []  # refused before any work
    smallest = re.search(r"Use --max-memory (\S+) or more", message).group(1)
    with pytest.raises(ConfigError, match="below the smallest workable budget"):
        fuse(base, adapter, tmp_path / "out", max_memory=int(0.9 * parse_size(smallest)))
    assert fuse(base, adapter, tmp_path / "out", max_memory=smallest).memory.blocked  # the minimum works


def test_bin_tensors_are_held_above_the_budget_and_said_so(tmp_path, gen):
    binary = tmp_path / "bin"
    binary.mkdir()
    with Checkpoint.open(LLAMA) as ckpt:
        torch.save({n: ckpt.get(n) for n in ckpt.names()}, binary / "pytorch_model.bin")
    shutil.copy(LLAMA / "config.json", binary / "config.json")
    mods = {Q: AdapterModule(Q, torch.randn(2, 64, generator=gen), torch.randn(64, 2, generator=gen))}
    adapter = Adapter(LoraConfig(r=2, lora_alpha=4, target_modules=[Q]), mods)
    report = fuse(binary, adapter, tmp_path / "fused", max_memory="40KB")
    assert report.memory.blocked == []
    over = "; ".join(report.memory.over_budget)
    assert "model.embed_tokens.weight" in over and ".bin checkpoints cannot be read in row blocks" in over
    assert "held whole above the budget" in report.render()


def _cli(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("command", [["fuse", str(LLAMA), "ADAPTER"], ["residualize", str(LLAMA)]])
def test_cli_bad_max_memory_exits_2_with_the_accepted_forms(tmp_path, command):
    result = _cli(*command, "-o", str(tmp_path / "out"), "--max-memory", "lots")
    assert result.exit_code == 2
    assert "Invalid value for '--max-memory': 'lots' is not a size; accepted forms: " in result.output
    assert SIZE_FORMS.split(" (")[0] in result.output
    assert not (tmp_path / "out").exists()
    assert "--max-memory SIZE" in _cli(command[0], "--help").output


def test_cli_fuse_reports_the_budget(tmp_path, extracted):
    base, adapter = extracted["llama"]
    result = _cli("fuse", str(base), str(adapter), "-o", str(tmp_path / "out"), "--max-memory", "64GB", "--json")
    assert result.exit_code == 0, result.output
    memory = json.loads(result.output)["memory"]
    assert memory["max_memory"] == 64 * 10**9 and memory["row_blocks"] == []
    assert memory["budget"].startswith("--max-memory 64GB for the whole process, ")
