"""Every adapter a lorasurg command writes validates with no error and no warning against its base.

``WRITERS`` lists one entry per (command, interesting option set): a function that writes an adapter into the
directory it is given and returns the base model to validate against. Add an entry when a command that writes
adapters lands. Inputs a command reads (adapters to re-rank, merge or convert) are written next to that directory.

The base is the model the adapter belongs on: BASE for extract, rerank and merge; the residual model it wrote for
residualize's initial adapter (``OUT/model``); the ORIGINAL base for convert's plain LoRA. An entry written ``--for``
a consumer (``consumers=``) is also validated ``--for`` it: nothing that consumer would refuse, drop or scale
differently from PEFT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

import shutil

from lorasurg import convert_to_dir, export_gguf, extract_to_dir, merge_to_dir, rerank_to_dir, residualize, validate

from tests.surgery.moe_adapters import base_of, family_adapter

ROOT = Path(__file__).resolve().parents[3]


def _pair(arch: str) -> tuple[Path, Path]:
    """The tiny pair, or a MoE / multimodal family's (fixtures/families.py)."""
    for group in ("moe", "vlm"):
        if (ROOT / "fixtures" / group / arch).is_dir():
            return ROOT / "fixtures" / group / arch / "base", ROOT / "fixtures" / group / arch / "tuned"
    return ROOT / "fixtures" / f"tiny-{arch}" / "base", ROOT / "fixtures" / f"tiny-{arch}" / "tuned"


def _extract(arch: str, **options) -> Callable[[Path], Path]:
    def write(out: Path) -> Path:
        base, tuned = _pair(arch)
        extract_to_dir(base, tuned, out, device="cpu", **options)
        return base

    return write


def _input(out: Path, name: str, arch: str, **options) -> Path:
    """An extract of ``arch``'s pair written next to ``out`` (an input of rerank or merge)."""
    path = out.parent / f"{out.name}.in-{name}"
    base, tuned = _pair(arch)
    extract_to_dir(base, tuned, path, device="cpu", **options)
    return path


def _extract_resized(**options) -> Callable[[Path], Path]:
    """An extract of a pair whose tuned model added tokens: validated against BASE (it warns that BASE needs a
    resize first), so the writer returns the tuned model, whose vocabulary the adapter fits."""
    from tests.surgery.resized import resized_pair

    def write(out: Path) -> Path:
        base, tuned = resized_pair(out.parent)
        extract_to_dir(base, tuned, out, device="cpu", **options)
        return tuned

    return write


def _rerank(arch: str, extract: dict, **options) -> Callable[[Path], Path]:
    def write(out: Path) -> Path:
        rerank_to_dir(_input(out, "src", arch, **extract), out, **options)
        return _pair(arch)[0]

    return write


def _merge(arch: str, extracts: list[dict], **options) -> Callable[[Path], Path]:
    def write(out: Path) -> Path:
        sources = [_input(out, str(i), arch, **e) for i, e in enumerate(extracts)]
        merge_to_dir(sources, out, **options)
        return _pair(arch)[0]

    return write


def _family_input(out: Path, name: str, family: str, **adapter) -> Path:
    """A seeded MoE/VLM adapter in the layout PEFT loads for ``family`` (tests/surgery/moe_adapters.py), next to
    ``out``."""
    path = out.parent / f"{out.name}.in-{name}"
    family_adapter(family, **adapter).save(path)
    return path


def _family_rerank(family: str, adapter: dict, **options) -> Callable[[Path], Path]:
    def write(out: Path) -> Path:
        rerank_to_dir(_family_input(out, "src", family, **adapter), out, **options)
        return base_of(family)

    return write


def _family_merge(family: str, adapters: list[dict], **options) -> Callable[[Path], Path]:
    def write(out: Path) -> Path:
        merge_to_dir([_family_input(out, str(i), family, **a) for i, a in enumerate(adapters)], out, **options)
        return base_of(family)

    return write


def _residualize(arch: str, **options) -> Callable[[Path], Path]:
    """residualize's ``OUT/adapter`` moved to ``out``; validated against the residual model it wrote."""

    def write(out: Path) -> Path:
        written = out.parent / f"{out.name}.residualize"
        residualize(_pair(arch)[0], written, device="cpu", **options)
        shutil.move(written / "adapter", out)
        return written / "model"

    return write


PISSA = ROOT / "fixtures" / "tiny-llama" / "pissa"


def _convert(**options) -> Callable[[Path], Path]:
    """The fixture's trained PiSSA adapter as plain LoRA: validated against the ORIGINAL base."""

    def write(out: Path) -> Path:
        convert_to_dir(PISSA / "trained", PISSA / "adapter", out, **options)
        return _pair("llama")[0]

    return write


def _for(consumers: str, writer: Callable[[Path], Path]) -> Callable[[Path], Path]:
    """Mark ``writer`` (made with ``consumers=consumers``) to be validated ``--for`` those consumers too."""
    writer.consumers = consumers  # type: ignore[attr-defined]
    return writer


R8, ENERGY = dict(r=8), dict(r=32, rank_policy="energy:0.9")
SAME_RANK = [dict(r=8), dict(r=8, alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])]
MIXED = [dict(r=8), ENERGY]
DENSE = dict(density=0.5, r=8)

def _gguf_residualize(arch: str, **options) -> Callable[[Path], Path]:
    """residualize --to gguf's ``OUT/adapter.gguf`` moved to ``out``; validated against the residual model."""

    def write(out: Path) -> Path:
        written = out.parent / f"{out.name}.residualize"
        residualize(_pair(arch)[0], written, device="cpu", to="gguf", **options)
        shutil.move(written / "adapter.gguf", out)
        return written / "model"

    return write


def _export(arch: str, extract: dict, **options) -> Callable[[Path], Path]:
    """``lorasurg export --to gguf`` of an extract: the file (at ``out``) validated against BASE."""

    def write(out: Path) -> Path:
        export_gguf(_input(out, "src", arch, **extract), out, **options)
        return _pair(arch)[0]

    return write


WRITERS: dict[str, Callable[[Path], Path]] = {
    "extract-llama-r8": _extract("llama", r=8),
    "extract-llama-r64-clamped": _extract("llama", r=64, embeddings="full"),
    "extract-qwen2-energy-bias": _extract("qwen2", r=32, rank_policy="energy:0.9"),
    "extract-qwen2-serving": _extract("qwen2", r=4, serving=True),
    "extract-gpt2-conv1d": _extract("gpt2", r=4),
    "extract-gpt2-embeddings-skip": _extract("gpt2", r=4, embeddings="skip", lora_bias=False),
    "extract-llama-energy-for-llama.cpp": _for("llama.cpp", _extract("llama", **ENERGY, consumers="llama.cpp")),
    "extract-llama-tokens-lm-head": _extract("llama", r=4, embeddings="tokens"),
    "extract-resized-vocabulary": _extract_resized(r=4),
    # extract on mixture-of-experts and multimodal models: per-expert and target_parameters layouts, model names
    "extract-qwen3-moe-r4": _extract("qwen3_moe", r=4),
    "extract-qwen3-moe-energy": _extract("qwen3_moe", r=16, rank_policy="energy:0.9"),
    "extract-mixtral-r4": _extract("mixtral", r=4),
    "extract-qwen2-moe-r4": _extract("qwen2_moe", r=4),
    "extract-deepseek-v3-r4": _extract("deepseek_v3", r=4),
    "extract-gpt-oss-r4": _extract("gpt_oss", r=4),
    "extract-qwen2-vl-r8": _extract("qwen2_vl", r=8),
    # residualize: the initial adapter on the residual model it wrote
    "residualize-llama-pissa": _residualize("llama", init="pissa", r=8),
    "residualize-llama-olora-clamped-rslora": _residualize("llama", init="olora", r=48, use_rslora=True,
                                                           target_modules=["q_proj", "k_proj", "down_proj"]),
    "residualize-llama-pissa-embeddings": _residualize("llama", init="pissa_niter_2", r=4,
                                                       target_modules=["q_proj", "embed_tokens"]),
    "residualize-gpt2-olora-conv1d": _residualize("gpt2", init="olora", r=4),
    # vLLM warns above --max-lora-rank 16 (consumer-max-rank), so r=16 here; clamped ranks padded --for all: below
    "residualize-llama-olora-rslora-for-vllm": _for("vllm", _residualize("llama", init="olora", r=16, use_rslora=True,
                                                                         consumers="vllm")),
    "residualize-llama-pissa-for-llama.cpp": _for("llama.cpp", _residualize("llama", init="pissa", r=48,
                                                                            use_rslora=True, consumers="llama.cpp",
                                                                            target_modules=["q_proj", "k_proj"])),
    "residualize-llama-pissa-for-all": _for("all", _residualize("llama", init="pissa", r=16, consumers="all")),
    # residualize on MoE (per-expert, target_parameters, gpt-oss's stored experts, DeepSeek-V3's dense layers as 2-D
    # target_parameters) and multimodal models (the model's namespace)
    "residualize-qwen3-moe-pissa": _residualize("qwen3_moe", init="pissa", r=4),
    "residualize-mixtral-olora": _residualize("mixtral", init="olora", r=4),
    "residualize-qwen2-moe-pissa": _residualize("qwen2_moe", init="pissa", r=4),
    "residualize-deepseek-v3-pissa-niter": _residualize("deepseek_v3", init="pissa_niter_2", r=4),
    "residualize-gpt-oss-pissa": _residualize("gpt_oss", init="pissa", r=4),
    "residualize-qwen2-vl-olora": _residualize("qwen2_vl", init="olora", r=4),
    "residualize-llava-pissa": _residualize("llava", init="pissa", r=4),
    # convert: the trained PiSSA adapter as plain LoRA on the original base
    "convert-pissa-exact": _convert(),
    "convert-pissa-rerank": _convert(r=6),
    "convert-pissa-for-llama.cpp": _for("llama.cpp", _convert(r=6, consumers="llama.cpp")),
    # rerank, down and up
    "rerank-llama-down": _rerank("llama", R8, r=4),
    "rerank-llama-up-padded": _rerank("llama", R8, r=12),
    "rerank-qwen2-energy-bias": _rerank("qwen2", ENERGY, rank_policy="energy:0.8"),
    "rerank-gpt2-conv1d": _rerank("gpt2", dict(r=8), r=3),
    "rerank-qwen2-for-vllm": _for("vllm", _rerank("qwen2", ENERGY, rank_policy="energy:0.8", consumers="vllm")),
    "rerank-llama-for-llama.cpp": _for("llama.cpp", _rerank("llama", ENERGY, r=6, consumers="llama.cpp")),
    # merge, every combination type
    "merge-llama-svd": _merge("llama", MIXED, method="svd", weights=[0.7, 0.3]),
    "merge-llama-cat": _merge("llama", MIXED, method="cat"),
    "merge-llama-linear": _merge("llama", SAME_RANK, method="linear", weights=[1.0, -0.5]),
    "merge-llama-ties": _merge("llama", SAME_RANK, method="ties", density=0.5),
    "merge-llama-dare-linear": _merge("llama", SAME_RANK, method="dare_linear", density=0.5),
    "merge-llama-dare-ties": _merge("llama", SAME_RANK, method="dare_ties", density=0.5, majority_sign="frequency"),
    "merge-llama-magnitude-prune": _merge("llama", SAME_RANK, method="magnitude_prune", density=0.5),
    "merge-llama-ties-svd": _merge("llama", MIXED, method="ties_svd", **DENSE),
    "merge-llama-dare-linear-svd": _merge("llama", MIXED, method="dare_linear_svd", **DENSE),
    "merge-llama-dare-ties-svd": _merge("llama", MIXED, method="dare_ties_svd", **DENSE),
    "merge-llama-magnitude-prune-svd": _merge("llama", MIXED, method="magnitude_prune_svd", **DENSE),
    # embeddings="lora" with lora_bias: the embedding saved whole in both (trainable tokens in one and a whole copy in
    # the other is refused: PEFT refuses both on one module)
    "merge-qwen2-svd-bias": _merge("qwen2", [dict(ENERGY, embeddings="lora"), dict(r=4)], method="svd"),
    "merge-gpt2-cat-conv1d": _merge("gpt2", [dict(r=4), dict(r=2)], method="cat"),
    "merge-qwen2-svd-for-vllm": _for("vllm", _merge("qwen2", [dict(ENERGY, embeddings="lora"), dict(r=4)], method="svd",
                                                    consumers="vllm")),
    "merge-llama-cat-for-llama.cpp": _for("llama.cpp", _merge("llama", MIXED, method="cat", consumers="llama.cpp")),
    # MoE and multimodal: per-expert modules at one rank and the global r, target_parameters per expert
    "rerank-qwen3-moe-per-expert-energy": _family_rerank("qwen3_moe", dict(r=3), rank_policy="energy:0.6"),
    "rerank-qwen3-moe-target-parameters-down": _family_rerank("qwen3_moe", dict(r=3, form="target-parameters"), r=2),
    "rerank-gpt-oss-up": _family_rerank("gpt_oss", dict(r=2), r=4),
    "rerank-deepseek-v3-down": _family_rerank("deepseek_v3", dict(r=3), r=1),
    "rerank-qwen2-vl-energy": _family_rerank("qwen2_vl", dict(r=3), rank_policy="energy:0.5"),
    "merge-qwen3-moe-cat": _family_merge("qwen3_moe", [dict(seed=1), dict(seed=2, r=3)], method="cat"),
    "merge-mixtral-svd": _family_merge("mixtral", [dict(seed=1), dict(seed=2, r=3)], method="svd", weights=[0.7, 0.3]),
    "merge-gpt-oss-ties": _family_merge("gpt_oss", [dict(seed=1), dict(seed=2)], method="ties", density=0.5),
    "merge-qwen2-moe-dare-linear-svd": _family_merge("qwen2_moe", [dict(seed=1), dict(seed=2, r=3)],
                                                     method="dare_linear_svd", density=0.5, r=2),
    "merge-deepseek-v3-attention-and-experts": _family_merge(
        "deepseek_v3", [dict(seed=1, targets=("q_b_proj", "kv_b_proj")), dict(seed=2, r=3)], method="cat"),
    "merge-llava-svd": _family_merge("llava", [dict(seed=1), dict(seed=2, r=3)], method="svd"),
    # GGUF LoRA files (export --to gguf, and --to gguf on the writers): validated as llama.cpp's loader reads them
    "export-llama-gguf": _export("llama", R8),
    "export-qwen2-gguf-q8_0": _export("qwen2", dict(r=8, lora_bias=False), outtype="q8_0"),
    "extract-gpt2-to-gguf": _extract("gpt2", r=4, to="gguf"),
    "extract-qwen2-energy-to-gguf": _extract("qwen2", **ENERGY, to="gguf"),
    "rerank-llama-to-gguf": _rerank("llama", ENERGY, r=6, to="gguf", outtype="f16"),
    "merge-llama-cat-to-gguf": _merge("llama", MIXED, method="cat", to="gguf"),
    "convert-pissa-to-gguf": _convert(r=6, to="gguf", base=ROOT / "fixtures" / "tiny-llama" / "base"),
    "residualize-llama-pissa-to-gguf": _gguf_residualize("llama", init="pissa", r=8),
}


#: writers whose output PEFT loads exactly (tests/parity) but that validate on main cannot read yet: target_parameters
#: and the model's namespace of multimodal towers (issue 16's validate work); strict, so each shows when it is done
@pytest.mark.parametrize("name", sorted(WRITERS))
def test_written_adapter_validates_clean(tmp_path, name):
    writer = WRITERS[name]
    base = writer(tmp_path / name)
    findings = validate(tmp_path / name, base, consumers=getattr(writer, "consumers", None))
    assert [(f.code, f.where, f.message) for f in findings] == []


def test_padded_for_all_is_not_a_wasted_rank(tmp_path):
    """``--for all`` with clamped ranks: k_proj (32x64, clamped to 32) is zero-padded to the others' 48, since vLLM's
    ``lora_alpha / r`` and llama.cpp's ``lora_alpha / r_m`` agree only at one rank. Validated ``--for all`` that is not
    ``rank-too-large`` (whose hint, a rank_pattern, would break the agreement); validated for PEFT alone it is, and
    vLLM's default --max-lora-rank is still reported."""
    base = _pair("llama")[0]
    residualize(base, tmp_path / "r", init="pissa", r=48, target_modules=["q_proj", "k_proj"], consumers="all",
                device="cpu")
    adapter, model = tmp_path / "r" / "adapter", tmp_path / "r" / "model"
    assert [f.code for f in validate(adapter, model, consumers="all")] == ["consumer-max-rank"]
    wasted = [f for f in validate(adapter, model) if f.code == "rank-too-large"]
    assert sorted(f.where for f in wasted) == ["model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.k_proj"]
    assert "16 of the rank is wasted" in wasted[0].message
