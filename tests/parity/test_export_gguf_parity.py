"""A GGUF LoRA file written by ``lorasurg export --to gguf``, read back with ``gguf.GGUFReader`` and put through
llama.cpp's rules (tests/surgery/gguf_helpers.py), gives PEFT's delta on every module: PEFT 0.21.2's own
``get_delta_weight`` of the adapter loaded with ``PeftModel.from_pretrained``.

Every adapter has mixed ranks and scales (layer 1: rank r - 1, alpha 3r), so lorasurg must rescale the factors
for llama.cpp's ``alpha / r``. f32 files agree to float32 rounding of the rescaled factors (a bound of ``4 (r + 2)``
ulps of ``s |B| @ |A|``, the matmul's rounding); f16/bf16/q8_0 to the type's rounding of each factor.
"""

from __future__ import annotations

import pytest

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

import torch  # noqa: E402

from lorasurg import export_gguf  # noqa: E402
from lorasurg.io.adapter import AdapterModule  # noqa: E402
from tests.conftest import assert_close_ulps  # noqa: E402
from tests.surgery.gguf_helpers import FIXTURES, build_base, config_of, gguf_deltas, random_adapter  # noqa: E402

ARCHS = {  # arch -> (GGUF architecture, Llama-family q/k row permutation)
    "llama": ("llama", True), "qwen2": ("qwen2", False), "gpt2": ("gpt2", False), "gemma2": ("gemma2", False),
    "gemma3": ("gemma3", False), "phi3": ("phi3", False),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {arch: FIXTURES.get(arch) or build_base(arch, root / arch) for arch in ARCHS}


def peft_deltas(base, adapter_dir) -> dict[str, torch.Tensor]:
    """``{module: delta}`` PEFT computes, in the base weight's orientation turned ``(out, in)`` (embedding
    ``(dim, vocab)``), from the adapter as PEFT loads it."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    loaded = peft.PeftModel.from_pretrained(model, adapter_dir)
    found = {}
    for name, module in loaded.base_model.model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and "default" in module.scaling:
            delta = module.get_delta_weight("default").detach().double()
            flip = isinstance(module, peft.tuners.lora.Embedding) or getattr(module, "fan_in_fan_out", False)
            found[name] = delta.T if flip else delta
    return found


def gguf_name(arch: str, module: str, layers: int) -> str:
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), layers)
    return names.get_name(module) + ".weight"


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_exported_file_gives_peft_delta_on_every_module(tmp_path, bases, arch):
    base = bases[arch]
    cfg = config_of(base)
    adapter = random_adapter(base, r=4, fan_in_fan_out=arch == "gpt2")
    adapter.save(tmp_path / "adapter")
    report = export_gguf(tmp_path / "adapter", tmp_path / "a.gguf", base=base)
    gguf_arch, permuted = ARCHS[arch]
    heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]} if permuted else None
    meta, deltas = gguf_deltas(tmp_path / "a.gguf", heads)
    assert meta["general.architecture"][0] == gguf_arch
    assert meta["general.type"][0] == "adapter" and meta["adapter.type"][0] == "lora"
    assert meta["adapter.lora.alpha"][1] == [gguf.GGUFValueType.FLOAT32]
    expected = peft_deltas(base, tmp_path / "adapter")
    left = {x.name for x in report.for_report.left_out}
    written = {m: gguf_name(gguf_arch, m, cfg.get("num_hidden_layers", cfg.get("n_layer"))) for m in expected
               if m not in left}
    assert sorted(deltas) == sorted(written.values())
    assert report.for_report.rescaled  # layer 1's scale 3 is not lora_alpha / r there
    for module, name in written.items():
        mod = adapter.modules[module]
        r, alpha = adapter.rank_alpha(module)
        A, B = (mod.A.double(), mod.B.double())
        magnitude = (alpha / r) * (B.abs() @ A.abs())
        assert_close_ulps(deltas[name].float(), expected[module].float(), ulps=4 * (r + 2),
                          magnitude=magnitude.float(), msg=f"{arch} {module} -> {name}")


def test_tied_heads_are_left_out_and_said(tmp_path, bases):
    """Gemma's head is always the embedding in llama.cpp (no output.weight) and GPT-2's is tied in its config: an
    lm_head LoRA there is listed as left out, with its share, not written."""
    for arch in ("gemma2", "gpt2"):
        adapter = random_adapter(bases[arch], r=4, fan_in_fan_out=arch == "gpt2", mixed=False)
        emb = next(m for m in adapter.modules.values() if m.embedding)
        adapter.modules["lm_head"] = AdapterModule("lm_head", torch.randn(4, emb.B.shape[0]) * 0.1,
                                                   torch.randn(emb.A.shape[1], 4) * 0.1)
        adapter.config.target_modules = set(adapter.config.target_modules) | {"lm_head"}
        report = export_gguf(adapter, tmp_path / f"{arch}.gguf", base=bases[arch])
        [head] = [x for x in report.for_report.left_out if x.name == "lm_head"]
        assert head.feature == "tied_head_lora" and 0 < head.share < 1


@pytest.mark.parametrize("outtype, rel", [("f16", 2 ** -10), ("bf16", 2 ** -7), ("q8_0", 1 / 127)])
def test_other_outtypes_round_each_factor_by_the_types_rounding(tmp_path, bases, outtype, rel):
    """Against the f32 file: each factor within the type's relative rounding of its values (q8_0: half a step of
    its 32-element block's scale d = max|block| / 127, plus the f16 rounding of d: 0.57 d; f16 for rows that are not
    a multiple of 32)."""
    adapter = random_adapter(bases["qwen2"], r=4)
    export_gguf(adapter, tmp_path / "f32.gguf", base=bases["qwen2"])
    report = export_gguf(adapter, tmp_path / f"{outtype}.gguf", base=bases["qwen2"], outtype=outtype)
    from tests.surgery.gguf_helpers import read_gguf

    meta32, exact = read_gguf(tmp_path / "f32.gguf")
    meta, rounded = read_gguf(tmp_path / f"{outtype}.gguf")
    types = {t for p in report.pairs for t in p.types}
    assert types == ({"Q8_0", "F16"} if outtype == "q8_0" else {outtype.upper()})
    for name, value in exact.items():
        if rounded[name].shape[-1] % 32 == 0 and outtype == "q8_0":
            blocks = value.reshape(-1, 32).abs().amax(dim=1, keepdim=True)
            bound = (blocks * rel * 0.57 + 1e-7).expand(-1, 32).reshape(value.shape)
        else:
            bound = value.abs() * (2 ** -10 if outtype == "q8_0" else rel) + 1e-7
        assert ((rounded[name] - value).abs() <= bound).all(), name
