"""rerank and merge on MoE and multimodal adapters, checked in PEFT 0.21.2 on transformers 5: the outputs load with no
missing or unexpected keys, and the deltas PEFT merges into the model (``merge_and_unload``, every parameter,
fused 3-D experts included) are what the operation means, expert by expert:

* rerank to the same rank (the config's r, the largest rank in these adapters; a fused gate_up_proj's per expert is
  twice the parts') and up (zero-padded) gives PEFT's deltas of the input;
* rerank down to rank k gives, per unit, the best rank-k approximation of the input's delta (a unit is what the
  adapter factors: a per-expert module, a slice of a fused gate_up_proj for per-expert adapters, an expert's whole
  matrix for target_parameters);
* merge ``cat`` gives the exact weighted sum of the inputs' deltas; ``svd`` its best rank-r approximation per unit.

The adapters are seeded random (tests/surgery/moe_adapters.py), in the layout PEFT loads for each family.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from lorasurg import Adapter, merge_to_dir, rerank_to_dir  # noqa: E402
from lorasurg.io.checkpoint import Checkpoint  # noqa: E402
from lorasurg.surgery.expert_groups import expert_groups  # noqa: E402

from tests.surgery.moe_adapters import base_of, family_adapter  # noqa: E402

CASES = [("qwen3_moe", None), ("qwen3_moe", "target-parameters"), ("mixtral", None), ("deepseek_v3", None),
         ("qwen2_moe", None), ("gpt_oss", None), ("qwen2_vl", None)]


def _model(family: str):
    base = base_of(family)
    cls = getattr(transformers, json.loads((base / "config.json").read_text())["architectures"][0])
    return cls.from_pretrained(base, dtype=torch.float32).eval()


def peft_deltas(family: str, path) -> dict[str, torch.Tensor]:
    """``{parameter: merged - base}`` for every parameter PEFT's ``merge_and_unload`` changes (float64)."""
    base = {k: v.clone() for k, v in _model(family).state_dict().items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(_model(family), path)
    troubles = [str(w.message) for w in caught if "missing" in str(w.message).lower()
                or "unexpected" in str(w.message).lower()]
    assert troubles == []
    merged = model.merge_and_unload().state_dict()
    return {k: (v.double() - base[k].double()) for k, v in merged.items() if k in base and not torch.equal(v, base[k])}


def units(family: str, per_expert: bool, name: str, delta: torch.Tensor) -> list[torch.Tensor]:
    """The matrices the adapter factors, inside one parameter's delta (see the module docstring)."""
    if delta.dim() == 2:
        return [delta]
    fused = {}
    if per_expert:
        with Checkpoint.open(base_of(family)) as ckpt:
            for slot in ckpt.describe().experts.values():
                fused.setdefault(slot.parameter, set()).add(slot.rows)
    rows = sorted(fused.get(name, ()))
    return [d[a:b] for d in delta for a, b in rows] if rows else list(delta)


def truncated(matrix: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def assert_units_close(family, per_expert, got: dict, want: dict, k=None, rel=1e-5):
    assert set(got) == set(want)
    for name in want:
        for g, w in zip(units(family, per_expert, name, got[name]), units(family, per_expert, name, want[name])):
            expected = w if k is None else truncated(w, k)
            assert float((g - expected).norm()) <= rel * max(float(w.norm()), 1e-12), name


@pytest.mark.parametrize("family,form", CASES)
def test_rerank_same_up_and_down(tmp_path, family, form):
    family_adapter(family, form=form, r=3).save(tmp_path / "in")
    want = peft_deltas(family, tmp_path / "in")
    source = Adapter.load(tmp_path / "in")
    same, per_expert = source.config.r, bool(expert_groups(source.modules))
    for r in (same, same + 2):
        rerank_to_dir(tmp_path / "in", tmp_path / f"r{r}", r=r)
        assert_units_close(family, per_expert, peft_deltas(family, tmp_path / f"r{r}"), want)
    rerank_to_dir(tmp_path / "in", tmp_path / "r1", r=1)
    assert_units_close(family, per_expert, peft_deltas(family, tmp_path / "r1"), want, k=1, rel=1e-4)


@pytest.mark.parametrize("family,form", CASES)
def test_merge_cat_and_svd_are_the_weighted_sum_per_expert(tmp_path, family, form):
    family_adapter(family, form=form, r=2, seed=1).save(tmp_path / "a")
    family_adapter(family, form=form, r=3, seed=2, alpha=1.5).save(tmp_path / "b")
    a, b = peft_deltas(family, tmp_path / "a"), peft_deltas(family, tmp_path / "b")
    per_expert = bool(expert_groups(Adapter.load(tmp_path / "a").modules))
    want = {name: 0.7 * a[name] - 0.4 * b[name] for name in a}
    merge_to_dir([tmp_path / "a", tmp_path / "b"], tmp_path / "cat", [0.7, -0.4], method="cat")
    assert_units_close(family, per_expert, peft_deltas(family, tmp_path / "cat"), want)
    merge_to_dir([tmp_path / "a", tmp_path / "b"], tmp_path / "svd", [0.7, -0.4], method="svd", r=2)
    assert_units_close(family, per_expert, peft_deltas(family, tmp_path / "svd"), want, k=2, rel=1e-4)
