"""An adapter rewritten by ``prepare_for`` is the same adapter to PEFT: same keys expected, same logits."""

from __future__ import annotations

import pytest

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from lorasurg.consumers import prepare_for  # noqa: E402
from lorasurg.io.adapter import Adapter, AdapterModule  # noqa: E402
from lorasurg.surgery.extract import extract  # noqa: E402
from lorasurg.targeting import anchored_pattern_key  # noqa: E402

from tests.parity.test_extract_parity import load_adapter, logits, pair, rel  # noqa: E402


@pytest.mark.parametrize("consumers", ["vllm", "llama.cpp", "all"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prepared_adapter_gives_peft_the_same_logits(tmp_path, arch, consumers):
    """Layer 1's modules are cut to rank 3 with alpha 6 (scale 2, the others scale 1), so ranks and scales are
    mixed; the parts no consumer carries (bias, saved modules, embedding LoRA) are left out of both adapters.
    Rewriting the scale, rescaling and padding must leave PEFT's output unchanged."""
    base, tuned = pair(arch)
    extracted, _ = extract(base, tuned, r=8, lora_bias=False, embeddings="skip")
    mods, ranks, alphas = {}, {}, {}
    for name, mod in extracted.modules.items():
        if ".layers.1." in name:
            mod = AdapterModule(name, mod.A[:3].clone(), mod.B[:, :3].clone())
            ranks[anchored_pattern_key(name)], alphas[anchored_pattern_key(name)] = 3, 6
        mods[name] = mod
    config = extracted.config
    config.rank_pattern, config.alpha_pattern = ranks, alphas
    mixed = Adapter(config, mods, {k: v for k, v in extracted.extra.items() if "norm" not in k})
    config.modules_to_save = None if not mixed.extra else config.modules_to_save
    carried, _ = prepare_for(mixed, "peft")
    rewritten, report = prepare_for(carried, consumers)
    carried.save(tmp_path / "a")
    rewritten.save(tmp_path / "b")
    pa, missing_a, unexpected_a, _ = load_adapter(base, tmp_path / "a")
    pb, missing_b, unexpected_b, _ = load_adapter(base, tmp_path / "b")
    assert missing_a == missing_b == [] and unexpected_a == unexpected_b == []
    assert report.left_out == []
    assert report.rescaled  # scale 2 on layer 1 (vllm: written at scale 1; llama.cpp: alpha / r_m)
    assert bool(report.padded) == (consumers == "all")
    assert rel(logits(pb), logits(pa)) < 1e-5
