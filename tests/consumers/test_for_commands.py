"""``--for`` on every command that writes an adapter besides extract: rerank, merge, convert, residualize.

For each command and consumer, the output written ``--for`` that consumer, read by the consumer's rule
(:func:`lorasurg.consumers.consumer_delta`), gives PEFT's per-module delta of the same command's ``--for peft``
output to 1e-5 relative; ``validate --for`` it finds no consumer problem and no error; and whatever the consumer
cannot carry is missing from the output only where the report lists it. residualize never leaves anything out:
its ``OUT/model`` is the same file whatever ``--for`` says, and a consumer that cannot carry the whole initial
adapter is refused before anything is written.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable, NamedTuple

import pytest
import torch
from safetensors.torch import load_file

from lorasurg import (
    Adapter, convert_to_dir, extract_to_dir, merge_to_dir, rerank_to_dir, residualize, validate,
)
from lorasurg.consumers import consumer_delta
from lorasurg.engine.factors import delta_matrix
from lorasurg.errors import ConfigError, InputError

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
LLAMA, QWEN2, GPT2 = (FIXTURES / f"tiny-{a}" / "base" for a in ("llama", "qwen2", "gpt2"))
REL = 1e-5
READERS = {"peft": ["peft"], "vllm": ["peft", "vllm", "vllm<0.32"], "llama.cpp": ["peft", "llama.cpp"],
           "all": ["peft", "vllm", "vllm<0.32", "llama.cpp"]}


def _trained(initial: Path, out: Path, seed: int) -> Path:
    """``initial`` plus seeded Gaussian noise (std 0.02) on every factor: a stand-in for training."""
    adapter = Adapter.load(initial)
    g = torch.Generator().manual_seed(seed)
    for mod in adapter.modules.values():
        mod.A = mod.A + 0.02 * torch.randn(mod.A.shape, generator=g, dtype=mod.A.dtype)
        mod.B = mod.B + 0.02 * torch.randn(mod.B.shape, generator=g, dtype=mod.B.dtype)
    adapter.save(out)
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Adapters the commands read: extract outputs, an rsLoRA one, PiSSA/OLoRA initial and trained pairs."""
    root = tmp_path_factory.mktemp("inputs")
    made = {}

    def ext(name, arch, **options):
        options.setdefault("embeddings", "lora")  # what the consumers' embedding and tied-head rules are about
        made[name] = root / name
        extract_to_dir(FIXTURES / f"tiny-{arch}" / "base", FIXTURES / f"tiny-{arch}" / "tuned", made[name],
                       device="cpu", **options)

    ext("llama-r8", "llama", r=8)
    ext("llama-energy", "llama", r=32, rank_policy="energy:0.9")
    ext("qwen2-energy", "qwen2", r=32, rank_policy="energy:0.9")  # lora_bias, embedding and norm saved whole
    ext("qwen2-r4", "qwen2", r=4)
    ext("qwen2-tied", "qwen2", r=8, lora_bias=False)  # embedding LoRA, lm_head tied to it
    rs = Adapter.load(made["llama-energy"])  # the same factors read as rsLoRA: scales alpha_m / sqrt(r_m)
    Adapter(dataclasses.replace(rs.config, use_rslora=True), rs.modules, rs.extra).save(root / "llama-rslora")
    made["llama-rslora"] = root / "llama-rslora"
    made["pissa-init"], made["pissa-trained"] = FIXTURES / "tiny-llama" / "pissa" / "adapter", FIXTURES / "tiny-llama" / "pissa" / "trained"
    residualize(LLAMA, root / "olora", init="olora", r=48, use_rslora=True, device="cpu",
                target_modules=["q_proj", "k_proj", "down_proj"])  # k_proj clamped to 32: mixed ranks, rsLoRA
    made["olora-init"], made["olora-trained"] = root / "olora" / "adapter", _trained(root / "olora" / "adapter", root / "olora-trained", 1)
    residualize(GPT2, root / "gpt2", init="olora", r=4, device="cpu")  # Conv1D (fan_in_fan_out) only
    made["gpt2-init"], made["gpt2-trained"] = root / "gpt2" / "adapter", _trained(root / "gpt2" / "adapter", root / "gpt2-trained", 2)
    return made


class Written(NamedTuple):
    adapter: Path
    base: Path
    report: object


class Case(NamedTuple):
    write: Callable[[dict, Path, str], Written]
    refused: tuple[str, ...] = ()  # consumers for which nothing of the output can be written


def _rerank(source: str, base: Path, **options) -> Callable:
    return lambda i, out, c: Written(out, base, rerank_to_dir(i[source], out, consumers=c, **options))


def _merge(sources: list[str], base: Path, **options) -> Callable:
    return lambda i, out, c: Written(out, base, merge_to_dir([i[s] for s in sources], out, consumers=c, **options))


def _convert(pair: str, base: Path, **options) -> Callable:
    return lambda i, out, c: Written(out, base, convert_to_dir(i[f"{pair}-trained"], i[f"{pair}-init"], out,
                                                               consumers=c, **options))


def _residualize(base: Path, **options) -> Callable:
    def write(i, out, c):
        report = residualize(base, out, consumers=c, device="cpu", **options)
        return Written(out / "adapter", out / "model", report)

    return write


CASES: dict[str, Case] = {
    "rerank-qwen2-energy-bias": Case(_rerank("qwen2-energy", QWEN2, rank_policy="energy:0.9")),
    "rerank-qwen2-tied-head": Case(_rerank("qwen2-tied", QWEN2, rank_policy="energy:0.8")),
    "rerank-llama-rslora": Case(_rerank("llama-rslora", LLAMA, r=6)),
    "merge-llama-cat": Case(_merge(["llama-r8", "llama-energy"], LLAMA, method="cat", weights=[0.7, 0.3])),
    "merge-qwen2-svd-bias": Case(_merge(["qwen2-energy", "qwen2-r4"], QWEN2, method="svd")),
    "convert-pissa": Case(_convert("pissa", LLAMA)),
    "convert-olora-rslora-clamped": Case(_convert("olora", LLAMA)),
    "convert-olora-rerank": Case(_convert("olora", LLAMA, r=40)),
    "convert-gpt2-conv1d": Case(_convert("gpt2", GPT2), refused=("llama.cpp", "all")),
    "residualize-llama-pissa": Case(_residualize(LLAMA, init="pissa", r=8)),
    "residualize-llama-rslora-clamped": Case(_residualize(LLAMA, init="pissa_niter_2", r=48, use_rslora=True,
                                                          target_modules=["q_proj", "k_proj", "down_proj"])),
    "residualize-gpt2-vllm": Case(_residualize(GPT2, init="olora", r=4), refused=("llama.cpp", "all")),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30))


@pytest.fixture(scope="module")
def peft_outputs(inputs, tmp_path_factory) -> dict[str, Written]:
    root = tmp_path_factory.mktemp("peft")
    return {name: case.write(inputs, root / name, "peft") for name, case in CASES.items()}


@pytest.mark.parametrize("consumer", ["vllm", "llama.cpp", "all"])
@pytest.mark.parametrize("name", list(CASES))
def test_written_for_a_consumer_it_reads_peft_delta(name, consumer, inputs, peft_outputs, tmp_path):
    case, ref = CASES[name], peft_outputs[name]
    if consumer in case.refused:
        with pytest.raises((InputError, ConfigError)) as err:
            case.write(inputs, tmp_path / "out", consumer)
        assert "Conv1D" in str(err.value) and not (tmp_path / "out").exists()
        return
    got = case.write(inputs, tmp_path / "out", consumer)
    want, written = Adapter.load(ref.adapter), Adapter.load(got.adapter)
    assert written.problems() == []
    for module in written.modules:
        peft = consumer_delta(want, "peft", module)
        expect = delta_matrix(peft, torch.float64)
        for reader in READERS[consumer]:
            f = consumer_delta(written, reader, module)
            assert f is not None, (reader, module)
            assert _rel(delta_matrix(f, torch.float64), expect) <= REL, (reader, module)
            if f.bias is not None:  # PEFT applies scale * lora_B.bias
                assert _rel(f.bias.double() * f.scale, peft.bias.double() * peft.scale) <= REL, (reader, module)
    # what is missing is listed, with its share where the adapter knows it
    report = got.report
    listed = {(x.name, x.feature) for x in report.for_report.left_out}
    names = {n for n, _ in listed}
    assert set(want.modules) - set(written.modules) <= names
    assert {k for k in want.extra if k not in written.extra} <= names
    for module, mod in want.modules.items():
        if mod.bias is not None and want.config.lora_bias and module in written.modules:
            assert written.modules[module].bias is not None or (module, "lora_bias") in listed
    for x in report.for_report.left_out:
        assert x.feature in ("modules_to_save", "saved_norms", "dora") or 0 <= x.share <= 1
    if name.startswith("residualize"):  # lossless only: nothing left out, the residual model is the same file
        assert report.for_report.left_out == [] and set(written.modules) == set(want.modules)
        for f in sorted(p.name for p in ref.base.glob("*.safetensors")):
            assert (got.base / f).read_bytes() == (ref.base / f).read_bytes()
    # the report says how it was written, and validate --for finds nothing the consumer would misread
    data = report.to_dict()
    assert data["settings"]["for"] == list(report.consumers) and data["for"]["layout"] == report.for_report.layout
    assert "written for " in report.render()
    findings = validate(got.adapter, got.base, consumers=consumer)
    assert [f.code for f in findings if f.severity == "error"] == []
    assert [f.code for f in findings if f.code.startswith("consumer-") and f.code != "consumer-max-rank"] == []


@pytest.mark.parametrize("name", list(CASES))
def test_for_peft_is_the_output_as_before(name, peft_outputs):
    report = peft_outputs[name].report
    assert report.consumers == ["peft"] and report.for_report.layout == "patterns"
    assert report.for_report.left_out == [] and "written for" not in report.render()
    assert report.to_dict()["for"]["consumers"] == ["peft"]


def test_rerank_keeps_a_tied_head_tied_for_llama_cpp(inputs, tmp_path):
    """qwen2's lm_head LoRA is the embedding's, transposed; after re-ranking both it is not bit-identical any more,
    so the tie is taken from the input adapter. llama.cpp refuses lm_head LoRA on a tied head
    (convert_lora_to_gguf.py LoraModel.modify_tensors): left out for it, kept for vLLM's Llama-style rule."""
    report = rerank_to_dir(inputs["qwen2-tied"], tmp_path / "l", rank_policy="energy:0.8", consumers="llama.cpp")
    (head,) = [x for x in report.for_report.left_out if x.name == "lm_head"]
    assert head.feature == "tied_head_lora" and head.consumers == ("llama.cpp",) and head.share > 0
    assert "lm_head" not in Adapter.load(tmp_path / "l").modules
    assert "llama.cpp: leaves out" in report.render() and "lm_head" in report.render()


def test_residualize_for_all_pads_losslessly_and_model_is_unchanged(tmp_path):
    """Clamped ranks (k_proj 32, the others 48) with rsLoRA: --for all pads k_proj to 48 with zeros and writes
    lora_alpha = scale * 48 without rsLoRA; scale * B0 @ A0 is the same, so OUT/model + OUT/adapter is still BASE."""
    opts = dict(init="olora", r=48, use_rslora=True, target_modules=["q_proj", "k_proj"], device="cpu")
    plain = residualize(LLAMA, tmp_path / "p", **opts)
    padded = residualize(LLAMA, tmp_path / "a", consumers="all", **opts)
    a, b = Adapter.load(tmp_path / "p" / "adapter"), Adapter.load(tmp_path / "a" / "adapter")
    assert b.config.use_rslora is False and b.config.rank_pattern == {} and {m.rank for m in b.modules.values()} == {48}
    assert set(padded.for_report.padded) == {n for n in a.modules if n.endswith("k_proj")}
    for name, mod in b.modules.items():
        k = a.modules[name].rank
        assert torch.equal(mod.A[:k], a.modules[name].A) and torch.equal(mod.B[:, :k], a.modules[name].B)
        assert not mod.A[k:].any() and not mod.B[:, k:].any()
    # the rsLoRA scale alpha / sqrt(r) = 48 / sqrt(48) on every module, written as lora_alpha / 48
    assert float(b.config.lora_alpha) / 48 == pytest.approx(48 / math.sqrt(48), rel=1e-9)
    assert load_file(tmp_path / "p" / "model" / "model.safetensors").keys() == load_file(
        tmp_path / "a" / "model" / "model.safetensors").keys()
    assert plain.for_report.layout == "patterns" and padded.for_report.layout == "padded"


def test_residualize_refuses_a_consumer_that_cannot_carry_the_whole_adapter(tmp_path):
    with pytest.raises(ConfigError) as err:
        residualize(LLAMA, tmp_path / "v", r=4, target_modules=["q_proj", "embed_tokens"], consumers="vllm",
                    device="cpu")
    text = str(err.value)
    assert "model.embed_tokens" in text and "vLLM reads embedding LoRA only for" in text
    assert "--exclude-modules model.embed_tokens" in text and "Nothing was written" in text
    assert not (tmp_path / "v").exists()
    with pytest.raises(ConfigError, match="transformer.h.0.attn.c_attn.*llama.cpp transposes GPT-2 Conv1D"):
        residualize(GPT2, tmp_path / "g", r=4, consumers="llama.cpp", device="cpu")
    assert not (tmp_path / "g").exists()


def test_validate_finds_an_embedding_lora_of_a_tied_base_for_llama_cpp(inputs, tmp_path):
    """An embedding LoRA without a head LoRA (as PEFT trains with target_modules embed_tokens): the adapter does not
    say the head is tied; --base does (qwen2's tie_word_embeddings), and llama.cpp's head product would take the
    embedding's pair and stop (GGML_ASSERT ggml_can_mul_mat). Without --base nothing is known, and nothing said."""
    tied = Adapter.load(inputs["qwen2-tied"])
    del tied.modules["lm_head"]
    tied.config = dataclasses.replace(tied.config, target_modules=set(tied.config.target_modules) - {"lm_head"})
    tied.save(tmp_path / "emb")
    with_base = [f for f in validate(tmp_path / "emb", QWEN2, consumers="llama.cpp") if f.code == "consumer-refuses"]
    assert [f.modules for f in with_base] == [("model.embed_tokens",)] and "ggml_can_mul_mat" in with_base[0].message
    alone = validate(tmp_path / "emb", consumers="llama.cpp")
    assert not [f for f in alone if "model.embed_tokens" in f.modules and f.code == "consumer-refuses"]
    assert [f for f in validate(tmp_path / "emb", QWEN2, consumers="vllm") if "ggml" in f.message] == []
