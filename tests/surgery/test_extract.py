"""``lorasurg.surgery.extract``: fit quality, what each changed tensor becomes, config, streaming."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorasurg.engine.factors import delta_matrix, lora_scale, weight_to_matrix
from lorasurg.engine.ranks import parse_rank_policy
from lorasurg.io.checkpoint import Checkpoint
from lorasurg.modules import ModuleInfo
from lorasurg.surgery.extract import run as extract_mod
from lorasurg.surgery.extract.fit import fit_delta
from lorasurg.surgery.extract.plan import plan_roles
from lorasurg.surgery.extract import extract
from lorasurg.targeting import anchored_pattern_key, rank_alpha
from tests.conftest import tol

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def pair(arch: str) -> tuple[Path, Path]:
    return FIXTURES / f"tiny-{arch}" / "base", FIXTURES / f"tiny-{arch}" / "tuned"


@functools.lru_cache(maxsize=None)
def ckpt(path: Path) -> Checkpoint:
    return Checkpoint.open(path)


def true_delta(arch: str, module: str) -> torch.Tensor:
    b, t = (ckpt(p) for p in pair(arch))
    return t.get(f"{module}.weight", dtype=torch.float64) - b.get(f"{module}.weight", dtype=torch.float64)


def module_delta(adapter, module: str, kind: str) -> torch.Tensor:
    """scale * B @ A of one adapter module, as a float64 (out, in) matrix."""
    from lorasurg.engine.factors import LoraFactors

    mod = adapter.modules[module]
    r, alpha = rank_alpha(adapter.config, module)
    f = LoraFactors(kind, mod.A.double(), mod.B.double(), lora_scale(r, alpha))
    return delta_matrix(f)


def _with_spectrum(s: torch.Tensor, out_f: int, in_f: int, gen: torch.Generator) -> torch.Tensor:
    k = s.numel()
    U, _ = torch.linalg.qr(torch.randn(out_f, k, generator=gen, dtype=torch.float64))  # (out, k)
    V, _ = torch.linalg.qr(torch.randn(in_f, k, generator=gen, dtype=torch.float64))  # (in, k)
    return (U * s) @ V.T  # (out, k) * (k,) @ (k, in)


# ------------------------------------------------------------------------------------------------ fit quality
@pytest.mark.parametrize("spectrum", ["flat", "power_law_0.5", "power_law_1"])
@pytest.mark.parametrize("r", [4, 16])
def test_fit_error_within_one_percent_of_optimal(spectrum, r, gen):
    k = 96
    i = torch.arange(1, k + 1, dtype=torch.float64)
    s = torch.ones(k, dtype=torch.float64) if spectrum == "flat" else i ** -float(spectrum.rsplit("_", 1)[1])
    dW = _with_spectrum(s, 160, k, gen)
    optimal = float(s[r:].pow(2).sum().sqrt())
    fit = fit_delta(dW.float().clone(), r=r, scale=2.0, method="randomized", generator=gen)
    error = float(torch.linalg.vector_norm(dW - 2.0 * fit.B.double() @ fit.A.double()))  # (out, r) @ (r, in)
    assert fit.rank == r
    assert error <= 1.01 * optimal
    assert fit.rel_error == pytest.approx(error / float(torch.linalg.vector_norm(dW)), rel=1e-4)
    assert fit.energy_kept == pytest.approx(float(s[:r].pow(2).sum() / s.pow(2).sum()), rel=1e-2)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_every_module_within_one_percent_of_optimal(arch):
    adapter, report = extract(*pair(arch), r=8)
    for fit in report.fits:
        if "tied" in fit.kind:
            continue
        dW = true_delta(arch, fit.module)
        kind = "embedding" if fit.kind == "embedding" else "linear"
        info = ckpt(pair(arch)[0]).module_infos()[fit.module]
        matrix = weight_to_matrix(dW, kind, info.fan_in_fan_out)  # (out, in)
        S = torch.linalg.svdvals(matrix)
        optimal = float(S[fit.rank:].pow(2).sum().sqrt())
        error = float(torch.linalg.vector_norm(matrix - module_delta(adapter, fit.module, kind)))
        assert error <= 1.01 * optimal + 1e-6, fit.module
        assert fit.rel_error == pytest.approx(error / float(torch.linalg.vector_norm(matrix)), rel=1e-3, abs=1e-5)


def test_exact_svd_at_full_rank_reproduces_the_delta():
    adapter, report = extract(*pair("llama"), r=64, svd="exact")
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        torch.testing.assert_close(module_delta(adapter, module, "linear"), true_delta("llama", module),
                                   rtol=1e-4, atol=1e-5)
    assert all(f.rel_error < 1e-4 for f in report.fits)


# ------------------------------------------------------------------------------------------------ scale, alpha, ranks
def test_alpha_sets_the_scale_and_every_module_keeps_it():
    adapter, report = extract(*pair("llama"), r=48, alpha=96)
    cfg = adapter.config
    assert (cfg.r, cfg.lora_alpha) == (48, 96)
    # k_proj/v_proj are 32 x 64: clamped to rank 32 and given alpha 64 so their scale stays 2.
    key = anchored_pattern_key("model.layers.0.self_attn.k_proj")
    assert cfg.rank_pattern[key] == 32 and cfg.alpha_pattern[key] == 64
    for name in adapter.modules:
        r, alpha = rank_alpha(cfg, name)
        assert r == adapter.modules[name].rank
        assert lora_scale(r, alpha) == pytest.approx(2.0)
    assert any("clamped" in n and "k_proj (r=32)" in n for n in report.notes)
    assert {f.module for f in report.fits if f.clamped} >= {"model.layers.0.self_attn.k_proj"}


def test_energy_policy_gives_per_module_ranks_in_patterns():
    adapter, report = extract(*pair("llama"), r=64, rank_policy="energy:0.5")
    ranks = {f.module: f.rank for f in report.fits}
    # the fixture's linear deltas have 4 large singular values then a 1/i tail: half the energy needs <= 4
    assert all(1 <= ranks[m] <= 4 for m in ranks if "layers" in m)
    assert all(f.energy_kept >= 0.5 - 1e-6 for f in report.fits)
    for name, mod in adapter.modules.items():
        assert rank_alpha(adapter.config, name)[0] == mod.rank


def test_policies_choose_expected_ranks_on_constructed_spectra(gen):
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0625], dtype=torch.float64)
    dW = _with_spectrum(s, 24, 8, gen).float()
    energy = s.pow(2)
    # energy:F -> smallest k with sum(S[:k]^2) >= F * total
    for F in (0.7, 0.95, 0.999):
        want = int((torch.cumsum(energy, 0) < F * energy.sum()).sum()) + 1
        fit = fit_delta(dW.clone(), r=8, scale=1.0, policy=parse_rank_policy(f"energy:{F}"), method="exact")
        assert fit.rank == want
    # the cap --r still applies
    fit = fit_delta(dW.clone(), r=2, scale=1.0, policy=parse_rank_policy("energy:0.999"), method="exact")
    assert fit.rank == 2


# ------------------------------------------------------------------------------------------------ what becomes what
def test_every_changed_tensor_is_accounted_for():
    adapter, report = extract(*pair("llama"), r=8)
    outcomes = {o.name: o.outcome for o in report.outcomes}
    b, t = Checkpoint.open(pair("llama")[0]), Checkpoint.open(pair("llama")[1])
    changed = {n for n in b.names() if not torch.equal(b.get(n), t.get(n))}
    assert set(outcomes) == changed
    assert outcomes["model.layers.0.input_layernorm.weight"] == "modules_to_save"
    assert outcomes["model.embed_tokens.weight"] == "trainable_tokens"  # 32 rows changed: smaller than a LoRA
    assert adapter.config.trainable_token_indices == {"model.embed_tokens": list(range(16, 48))}
    assert torch.equal(adapter.token_rows()["model.embed_tokens"], t.get("model.embed_tokens.weight")[16:48])
    assert report.tensors_unchanged + len(changed) == report.tensors_compared == len(b.names())
    assert adapter.config.modules_to_save == ["model.layers.0.input_layernorm"]
    torch.testing.assert_close(adapter.extra["model.layers.0.input_layernorm.weight"],
                               t.get("model.layers.0.input_layernorm.weight"), rtol=0, atol=0)
    assert adapter.config.init_lora_weights is True
    assert not adapter.problems()


@pytest.mark.parametrize("mode", ["lora", "full", "skip"])
def test_embeddings_modes(mode):
    adapter, report = extract(*pair("llama"), r=8, embeddings=mode)
    outcome = {o.name: o for o in report.outcomes}["model.embed_tokens.weight"]
    if mode == "lora":
        assert adapter.modules["model.embed_tokens"].embedding
        assert outcome.outcome == "lora"
    elif mode == "full":
        assert "model.embed_tokens" not in adapter.modules
        assert "model.embed_tokens" in adapter.config.modules_to_save
        assert "model.embed_tokens.weight" in adapter.extra
        assert outcome.outcome == "modules_to_save"
    else:
        assert "model.embed_tokens" not in adapter.modules and "model.embed_tokens.weight" not in adapter.extra
        assert outcome.outcome == "dropped" and "--embeddings skip" in outcome.reason


def test_tied_embedding_is_read_once_and_written_for_both(monkeypatch):
    from lorasurg.io._shards import RowReader

    reads: list[str] = []
    real_get, real_rows = Checkpoint.get, RowReader.rows_into

    def counting_get(self, name, *args, **kwargs):
        reads.append(name)
        return real_get(self, name, *args, **kwargs)

    def counting_rows(self, start, stop, buffer):
        reads.append(f"{self.name}[{start}:{stop}]")
        return real_rows(self, start, stop, buffer)

    monkeypatch.setattr(Checkpoint, "get", counting_get)
    monkeypatch.setattr(RowReader, "rows_into", counting_rows)
    adapter, report = extract(*pair("qwen2"), r=8, lora_bias=False, embeddings="lora")
    emb, head = adapter.modules["model.embed_tokens"], adapter.modules["lm_head"]
    assert emb.embedding and not head.embedding
    torch.testing.assert_close(head.A, emb.B.T, rtol=0, atol=0)
    torch.testing.assert_close(head.B, emb.A.T, rtol=0, atol=0)
    rows = Checkpoint.open(pair("qwen2")[0]).shape("model.embed_tokens.weight")[0]
    spans = [r.partition("[")[2].rstrip("]") for r in reads if r.startswith("model.embed_tokens.weight")]
    assert sum(int(b) - int(a) for a, b in (span.split(":") for span in spans)) == 2 * rows  # once per checkpoint
    assert len(spans) == 2 * len(set(spans))
    assert not any(r.startswith("lm_head") for r in reads)
    assert any("lm_head shares its weight" in n for n in report.notes)


def test_lora_bias_auto_on_for_changed_biases():
    adapter, report = extract(*pair("qwen2"), r=8, embeddings="lora")
    cfg = adapter.config
    assert cfg.lora_bias is True and report.lora_bias
    b, t = Checkpoint.open(pair("qwen2")[0]), Checkpoint.open(pair("qwen2")[1])
    name = "model.layers.1.self_attn.k_proj"
    r, alpha = rank_alpha(cfg, name)
    db = t.get(f"{name}.bias") - b.get(f"{name}.bias")
    torch.testing.assert_close(adapter.modules[name].bias * lora_scale(r, alpha), db, **tol(torch.float32))
    # every LoRA target has a lora_B.bias, zero where nothing changed (o_proj has no bias at all)
    assert all(m.bias is not None for m in adapter.modules.values())
    assert torch.count_nonzero(adapter.modules["model.layers.0.self_attn.o_proj"].bias) == 0
    # PEFT refuses lora_bias on embeddings: the changed embedding is saved whole instead, and said so
    assert "model.embed_tokens" not in adapter.modules
    assert set(cfg.modules_to_save) >= {"model.embed_tokens", "lm_head"}
    assert any("refuses lora_bias on Embedding" in n for n in report.notes)
    assert any("no bias in the base model" in n for n in report.notes)


def test_no_lora_bias_lists_bias_deltas_as_dropped():
    adapter, report = extract(*pair("qwen2"), r=8, lora_bias=False)
    assert adapter.config.lora_bias is False
    dropped = [o for o in report.outcomes if o.name.endswith("q_proj.bias")]
    assert dropped and all(o.outcome == "dropped" for o in dropped)
    assert all(m.bias is None for m in adapter.modules.values())


def test_gpt2_conv1d_factors_in_linear_orientation():
    adapter, report = extract(*pair("gpt2"), r=64)
    mod = adapter.modules["transformer.h.0.attn.c_attn"]
    assert tuple(mod.A.shape) == (64, 64) and tuple(mod.B.shape) == (192, 64)  # (r, in), (out, r)
    assert adapter.config.fan_in_fan_out is True
    dW = true_delta("gpt2", "transformer.h.0.attn.c_attn")  # stored (in, out)
    torch.testing.assert_close(module_delta(adapter, "transformer.h.0.attn.c_attn", "linear"), dW.T,
                               rtol=1e-4, atol=1e-5)


def test_serving_writes_only_linear_lora_and_lists_the_rest():
    adapter, report = extract(*pair("qwen2"), r=8, serving=True)
    cfg = adapter.config
    assert not cfg.modules_to_save and not adapter.extra and cfg.lora_bias is False
    assert all(not m.embedding and m.bias is None for m in adapter.modules.values())
    assert "lm_head" not in adapter.modules
    left = {o.name: o for o in report.left_out()}
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.0.self_attn.q_proj.bias"} <= set(left)
    shares = [report.share(o) for o in left.values()]
    assert all(s > 0 for s in shares)
    assert report.to_dict()["totals"]["left_out_energy"] == pytest.approx(sum(shares))


def test_exclude_and_target_modules():
    adapter, report = extract(*pair("llama"), r=4, target_modules=["q_proj", "v_proj"],
                              exclude_modules=["model.layers.1.self_attn.v_proj"])
    assert set(adapter.modules) == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                                    "model.layers.0.self_attn.v_proj"}
    reasons = {o.name: o.reason for o in report.outcomes}
    assert "excluded" in reasons["model.layers.1.self_attn.v_proj.weight"]
    assert "not in --target-modules" in reasons["model.layers.0.mlp.up_proj.weight"]
    # the config selects exactly the fitted modules
    from lorasurg.targeting import select_modules

    infos = Checkpoint.open(pair("llama")[0]).module_infos()
    assert sorted(select_modules(adapter.config, infos)) == sorted(adapter.modules)


def test_plan_roles_rules():
    modules = {
        "emb": ModuleInfo("Embedding", "embedding", weight_shape=(10, 4)),
        "l.q": ModuleInfo("Linear", "linear", weight_shape=(4, 4), has_bias=True),
        "l.conv": ModuleInfo("Conv2d", "conv2d", weight_shape=(4, 4, 3, 3)),
        "l.norm": ModuleInfo("RMSNorm", None, weight_shape=(4,)),
        "head": ModuleInfo("Linear", "linear", weight_shape=(10, 4)),
    }
    names = ["emb.weight", "l.q.weight", "l.q.bias", "l.conv.weight", "l.norm.weight", "head.weight"]
    roles = plan_roles(names, modules, input_embedding="emb", output_layers={"head"}, lora_bias=True)
    assert [roles[n].role for n in names] == ["save", "lora", "bias", "lora", "save", "lora"]
    serving = plan_roles(names, modules, input_embedding="emb", output_layers={"head"}, serving=True)
    assert [serving[n].role for n in names] == ["drop", "lora", "drop", "drop", "drop", "drop"]
    aliased = plan_roles(names, modules, input_embedding="emb", aliases={"head.weight": "emb.weight"})
    assert aliased["head.weight"].role == "alias"


def test_streams_in_shard_order(tmp_path):
    from fixtures.make import make_pair

    base, tuned = make_pair("llama", tmp_path, hidden=32, layers=2, vocab=64, max_shard_size="20KB")
    names = Checkpoint.open(base).names()
    assert len(Checkpoint.open(base).files) > 1
    seen: list[str] = []
    extract(base, tuned, r=4, progress=lambda done, total, name: seen.append(name))
    assert seen == [n for n in names if n in seen]
    assert len(seen) == len(names)


def test_output_dtype_follows_request():
    adapter, _ = extract(*pair("llama"), r=4, dtype="bfloat16")
    assert {m.A.dtype for m in adapter.modules.values()} == {torch.bfloat16}
    assert {t.dtype for t in adapter.extra.values()} == {torch.bfloat16}
    adapter, _ = extract(*pair("llama"), r=4)
    assert {m.A.dtype for m in adapter.modules.values()} == {torch.float32}


def test_seeded_randomized_svd_is_reproducible():
    a1, _ = extract(*pair("llama"), r=4, seed=3)
    a2, _ = extract(*pair("llama"), r=4, seed=3)
    for name in a1.modules:
        assert torch.equal(a1.modules[name].A, a2.modules[name].A)


def test_saved_adapter_round_trips(tmp_path):
    from lorasurg.io.adapter import Adapter

    report = extract_mod.extract_to_dir(*pair("qwen2"), tmp_path / "out", r=4)
    loaded = Adapter.load(tmp_path / "out")
    assert not loaded.problems()
    state = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert report.adapter_bytes == sum(t.numel() * t.element_size() for t in state.values())
    assert math.isclose(report.to_dict()["totals"]["adapter_parameters"], sum(t.numel() for t in state.values()))


def force_streaming(monkeypatch, block_elements: int) -> None:
    """Make every LoRA target too large to hold under any budget, and blocks of about ``block_elements``."""
    from lorasurg.surgery.budget import MemoryBudget
    from lorasurg.surgery.extract import stream as _extract_stream

    real_place = MemoryBudget.place
    monkeypatch.setattr(MemoryBudget, "place",
                        lambda self, name, **kw: real_place(self, name, **dict(kw, hold_bytes=self.limit + 1)))
    monkeypatch.setattr(_extract_stream, "_BLOCK_ELEMENTS", block_elements)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_streamed_fit_matches_the_in_memory_fit(monkeypatch, arch):
    """LoRA targets over the memory budget are fitted from row blocks read from disk; force it on every one."""
    dense_adapter, dense = extract(*pair(arch), r=8)
    assert dense.streamed == []
    force_streaming(monkeypatch, block_elements=1000)  # several blocks per tensor
    adapter, report = extract(*pair(arch), r=8)
    lora = [o.name for o in report.outcomes if o.outcome == "lora"]
    assert lora and {t.name for t in report.streamed} == set(lora)
    assert all(t.block_rows < t.shape[0] for t in report.streamed if t.shape[0] * math.prod(t.shape[1:]) > 2000)
    assert [(o.name, o.outcome) for o in report.outcomes] == [(o.name, o.outcome) for o in dense.outcomes]
    assert [o.energy for o in report.outcomes] == pytest.approx([o.energy for o in dense.outcomes], rel=1e-5)
    assert report.tensors_unchanged == dense.tensors_unchanged
    for fit in report.fits:
        if "tied" in fit.kind:
            continue
        kind = "embedding" if fit.kind == "embedding" else "linear"
        info = ckpt(pair(arch)[0]).module_infos()[fit.module]
        matrix = weight_to_matrix(true_delta(arch, fit.module), kind, info.fan_in_fan_out)  # (out, in)
        optimal = float(torch.linalg.svdvals(matrix)[fit.rank:].pow(2).sum().sqrt())
        error = float(torch.linalg.vector_norm(matrix - module_delta(adapter, fit.module, kind)))
        assert error <= 1.01 * optimal + 1e-6, fit.module
        assert fit.rel_error == pytest.approx(error / float(torch.linalg.vector_norm(matrix)), rel=1e-3, abs=1e-5)
    assert adapter.modules.keys() == dense_adapter.modules.keys()


@pytest.mark.parametrize("decay", [0.0, 0.5, 1.0])
def test_streamed_fit_within_one_percent_on_hard_spectra(tmp_path, monkeypatch, decay, gen):
    """The streamed randomized SVD (one power iteration, wide oversampling) on flat and slowly decaying spectra."""
    from safetensors.torch import save_file

    k = 256
    s = torch.arange(1, k + 1, dtype=torch.float64) ** -decay
    W = torch.randn(512, k, generator=gen, dtype=torch.float64) * 0.02
    dW = _with_spectrum(s * 0.01, 512, k, gen)
    (tmp_path / "b").mkdir()
    (tmp_path / "t").mkdir()
    save_file({"layer.proj.weight": W.float()}, str(tmp_path / "b" / "model.safetensors"))
    save_file({"layer.proj.weight": (W + dW).float()}, str(tmp_path / "t" / "model.safetensors"))
    force_streaming(monkeypatch, block_elements=20_000)
    for r in (4, 16, 64):
        adapter, report = extract(tmp_path / "b", tmp_path / "t", r=r)
        assert [t.name for t in report.streamed] == ["layer.proj.weight"]
        actual = (Checkpoint.open(tmp_path / "t").get("layer.proj.weight", dtype=torch.float64)
                  - Checkpoint.open(tmp_path / "b").get("layer.proj.weight", dtype=torch.float64))
        optimal = float(torch.linalg.svdvals(actual)[r:].pow(2).sum().sqrt())
        error = float(torch.linalg.vector_norm(actual - module_delta(adapter, "layer.proj", "linear")))
        assert error <= 1.01 * optimal, (decay, r, error / optimal)
        assert report.fits[0].rel_error == pytest.approx(error / float(torch.linalg.vector_norm(actual)), rel=1e-3)


def test_rank_zero_modules_are_left_out_and_listed(tmp_path, gen):
    from safetensors.torch import save_file

    base = {f"layers.{i}.proj.weight": torch.randn(32, 16, generator=gen) for i in range(2)}
    tuned = dict(base)
    tuned["layers.0.proj.weight"] = base["layers.0.proj.weight"] + 1.0 * torch.randn(32, 16, generator=gen)
    tuned["layers.1.proj.weight"] = base["layers.1.proj.weight"] + 1e-3 * torch.randn(32, 16, generator=gen)
    for name, state in (("b", base), ("t", tuned)):
        (tmp_path / name).mkdir()
        save_file(state, str(tmp_path / name / "model.safetensors"))
    adapter, report = extract(tmp_path / "b", tmp_path / "t", r=4, rank_policy="sv_epsilon:0.5")
    assert list(adapter.modules) == ["layers.0.proj"]
    assert {o.name: o.outcome for o in report.outcomes}["layers.1.proj.weight"] == "rank0"
    assert any("rank 0" in n and "layers.1.proj" in n for n in report.notes)
    from lorasurg.targeting import select_modules

    infos = Checkpoint.open(tmp_path / "b").module_infos()
    assert select_modules(adapter.config, infos) == ["layers.0.proj"]


# ------------------------------------------------------------------------------------------------ memory budget
def _big_and_small(tmp_path, gen) -> tuple[Path, Path]:
    """bf16 checkpoints with a 512 x 256 and a 16 x 16 linear weight, both changed."""
    from safetensors.torch import save_file

    base = {"layers.0.big.weight": torch.randn(512, 256, generator=gen),
            "layers.0.small.weight": torch.randn(16, 16, generator=gen)}
    tuned = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    for name, state in (("b", base), ("t", tuned)):
        (tmp_path / name).mkdir()
        save_file({k: v.bfloat16() for k, v in state.items()}, str(tmp_path / name / "model.safetensors"))
    return tmp_path / "b", tmp_path / "t"


def test_budget_decides_per_tensor_which_deltas_are_streamed(tmp_path, gen):
    """1.5 MB: the 512 x 256 delta (2.2 MB to hold with the SVD's arrays) is streamed in blocks, the 16 x 16 held."""
    b, t = _big_and_small(tmp_path, gen)
    held_adapter, held = extract(b, t, r=8, dtype="float32")
    assert held.streamed == [] and "every LoRA target's delta held in memory" in held.render()
    adapter, report = extract(b, t, r=8, max_memory="1.5MB", dtype="float32")
    assert [s.name for s in report.streamed] == ["layers.0.big.weight"]
    streamed = report.streamed[0]
    assert streamed.hold_bytes > 1_500_000 and 1 < streamed.block_rows < 512  # several blocks, as the budget allows
    assert report.to_dict()["memory"] == {
        "max_memory": 1_500_000, "in_use_at_start": 0, "for_tensors": 1_500_000, "budget": "--max-memory 1.5MB",
        "streamed": [{"name": "layers.0.big.weight", "shape": [512, 256], "hold_bytes": streamed.hold_bytes,
                      "block_rows": streamed.block_rows, "reason": streamed.reason}],
    }
    text = report.render()
    assert "memory budget 1.5 MB (--max-memory 1.5MB): 1 LoRA target(s) streamed from disk" in text
    assert "layers.0.big.weight" in text.split("memory budget")[1]
    for module in ("layers.0.big", "layers.0.small"):  # the same sums in another order: the same fit
        streamed_delta, held_delta = (module_delta(a, module, "linear") for a in (adapter, held_adapter))
        assert float(torch.linalg.vector_norm(streamed_delta - held_delta)) <= 1e-4 * float(
            torch.linalg.vector_norm(held_delta)), module
    assert [f.rel_error for f in report.fits] == pytest.approx([f.rel_error for f in held.fits], rel=1e-4)


def test_budget_below_the_smallest_workable_one_says_what_that_is(tmp_path, gen):
    import re

    from lorasurg.errors import ConfigError
    from lorasurg.surgery.budget import parse_size

    b, t = _big_and_small(tmp_path, gen)
    with pytest.raises(ConfigError) as info:
        extract(b, t, r=8, max_memory="100KB")
    message = str(info.value)
    assert "the memory budget (--max-memory 100KB) is below the smallest workable budget for this input" in message
    assert "layers.0.big.weight needs one row of 4.1 KB and " in message and "to stream its 512 rows" in message
    smallest = re.search(r"Use --max-memory (\S+) or more", message).group(1)
    adapter, report = extract(b, t, r=8, max_memory=smallest)  # the minimum it names works: one-row blocks
    assert [s.name for s in report.streamed] == ["layers.0.big.weight"] and report.streamed[0].block_rows >= 1
    with pytest.raises(ConfigError):
        extract(b, t, r=8, max_memory=int(0.9 * parse_size(smallest)))
    with pytest.raises(ConfigError) as info:  # an exact SVD cannot stream: it needs the whole delta
        extract(b, t, r=8, svd="exact", max_memory=smallest)
    assert "to hold its delta for an exact SVD" in str(info.value) and "--svd randomized streams" in str(info.value)


def test_unparseable_budget_is_refused_before_any_work(monkeypatch):
    from lorasurg.errors import ConfigError

    monkeypatch.setattr(Checkpoint, "open", lambda *a, **k: pytest.fail("opened a checkpoint"))
    with pytest.raises(ConfigError, match=r"--max-memory '2 bananas' is not a size; accepted forms: .*500MB"):
        extract(*pair("llama"), max_memory="2 bananas")


def test_bin_checkpoints_are_held_above_the_budget_and_said_so(tmp_path):
    """.bin tensors cannot be read in row blocks: held whatever the budget, in one note (no error)."""
    import shutil

    for side in ("base", "tuned"):
        (tmp_path / side).mkdir()
        shutil.copy(FIXTURES / "tiny-llama" / side / "config.json", tmp_path / side / "config.json")
        torch.save(load_file(str(FIXTURES / "tiny-llama" / side / "model.safetensors")),
                   tmp_path / side / "pytorch_model.bin")
    adapter, report = extract(tmp_path / "base", tmp_path / "tuned", r=8, max_memory="100KB")
    reference, _ = extract(*pair("llama"), r=8)
    assert report.streamed == [] and adapter.modules.keys() == reference.modules.keys()
    notes = [n for n in report.notes if "above the memory budget" in n]
    assert len(notes) == 1 and notes[0].startswith(f"{len(report.fits)} LoRA target(s) held in memory")
    assert ".bin checkpoints cannot be read in row blocks (convert them to safetensors to stream)" in notes[0]
