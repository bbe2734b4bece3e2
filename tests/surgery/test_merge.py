"""``lorasurg.merge_adapters`` against the dense definitions: scales (rsLoRA, patterns), lora_bias, missing
modules, every layout; the merged config; and every refusal with its message."""

from __future__ import annotations

import pytest
import torch

from lorasurg.engine.combine import METHODS
from lorasurg.engine.sparsify import TENSOR_METHODS
from lorasurg.errors import ConfigError, InputError, OutputExistsError, UnsupportedError
from lorasurg.io.adapter import Adapter
from lorasurg.surgery.merge import merge_adapters, merge_to_dir
from tests.conftest import tol
from tests.surgery.adapters import LAYERS, dense_bias, dense_delta, make_adapter, module_scale

F64 = tol(torch.float64)


def _best(matrix: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def _pair(**config):
    a = make_adapter(r=4, lora_alpha=8, seed=1, dtype=torch.float64, **config)
    b = make_adapter(r=4, lora_alpha=2, seed=2, dtype=torch.float64, **config)
    return a, b


def _exact(adapters, weights, name):
    return sum(w * dense_delta(a, name) for a, w in zip(adapters, weights) if name in a.modules)


@pytest.mark.parametrize("config", [dict(), dict(use_rslora=True), dict(rank_pattern={"lin": 2, "c3": 3},
                                                                         alpha_pattern={"wide": 5})])
def test_cat_and_full_rank_svd_are_the_exact_weighted_sum(config):
    """Each adapter at its own scale (rsLoRA: alpha/sqrt(r); patterns applied), on every layout."""
    a, b = _pair(**config)
    weights = [0.7, -0.4]
    cat, _ = merge_adapters([a, b], weights, method="cat")
    svd, _ = merge_adapters([a, b], weights, method="svd", r=8)
    for name in a.modules:
        exact = _exact([a, b], weights, name)
        torch.testing.assert_close(dense_delta(cat, name), exact, **F64)
        torch.testing.assert_close(dense_delta(svd, name), exact, **F64)
        assert module_scale(cat, name) == 1.0 and module_scale(svd, name) == 1.0
    assert not cat.config.use_rslora and not svd.config.use_rslora


def test_svd_truncates_optimally_on_every_layout():
    a, b = _pair()
    merged, report = merge_adapters([a, b], [0.5, 0.5], method="svd", r=2)
    for name in a.modules:
        exact = _exact([a, b], [0.5, 0.5], name)
        torch.testing.assert_close(dense_delta(merged, name), _best(exact, 2), **F64)
        assert merged.modules[name].rank == 2 and merged.modules[name].kind == a.modules[name].kind
    for row in report.modules:
        exact = _exact([a, b], [0.5, 0.5], row.module)
        S = torch.linalg.svdvals(exact)
        assert row.energy_kept == pytest.approx(float(S[:2].pow(2).sum() / S.pow(2).sum()), rel=1e-8)
        assert row.rel_diff == pytest.approx(float(S[2:].pow(2).sum().sqrt() / S.pow(2).sum().sqrt()), rel=1e-6)


@pytest.mark.parametrize("method", ["ties_svd", "magnitude_prune_svd"])
def test_dense_methods_on_every_layout(method):
    """Conv1d and Conv3d included (PEFT's svd types break on them): trim the dense deltas, then rank k."""
    a, b = _pair()
    merged, _ = merge_adapters([a, b], [1.0, 0.5], method=method, r=3, density=0.4)
    base = method.removesuffix("_svd")
    for name in a.modules:
        deltas = [dense_delta(a, name), dense_delta(b, name)]
        expected = _best(TENSOR_METHODS[base](deltas, [1.0, 0.5], 0.4, "total", None), 3)
        torch.testing.assert_close(dense_delta(merged, name), expected, **F64)


def test_linear_on_every_layout_matches_its_definition():
    a, b = _pair(use_rslora=True)
    merged, report = merge_adapters([a, b], [0.6, 0.4], method="linear")
    for name in a.modules:
        c = [w * module_scale(x, name) for x, w in zip((a, b), (0.6, 0.4))]
        mods = [a.modules[name], b.modules[name]]
        B = sum(ci ** 0.5 * m.B.reshape(m.B.shape[0], -1) for ci, m in zip(c, mods))
        A = sum(ci ** 0.5 * m.A.reshape(m.A.shape[0], -1) for ci, m in zip(c, mods))
        torch.testing.assert_close(dense_delta(merged, name), B @ A, **F64)
    assert all(row.rel_diff > 0.05 for row in report.modules)  # the cross terms, reported
    assert any("cross terms" in n for n in report.notes)


def test_lora_bias_deltas_add_with_the_weights():
    a = make_adapter(r=4, lora_alpha=8, seed=1, dtype=torch.float64, lora_bias=True, use_rslora=True)
    b = make_adapter({n: s for n, s in LAYERS.items() if n != "emb"}, r=4, lora_alpha=3, seed=2,
                     dtype=torch.float64)  # no lora_bias: counts as zero bias
    merged, report = merge_adapters([a, b], [0.7, 0.3], method="svd")
    assert merged.config.lora_bias
    for name, mod in merged.modules.items():
        expected = 0.7 * dense_bias(a, name)
        torch.testing.assert_close(dense_bias(merged, name), expected, **F64)
    assert any("lora_B.bias deltas added" in n for n in report.notes)


def test_lora_bias_with_embedding_lora_is_refused():
    a = make_adapter(seed=1, lora_bias=True)  # no embedding
    b = make_adapter(seed=2)  # has "emb"
    with pytest.raises(InputError, match="adapter 0 carries lora_B.bias.*embedding module.*emb; PEFT refuses"):
        merge_adapters([a, b])


def test_modules_missing_from_an_input_count_as_zero():
    a = make_adapter({"lin": LAYERS["lin"], "c2": LAYERS["c2"]}, r=4, seed=1, dtype=torch.float64)
    b = make_adapter({"lin": LAYERS["lin"], "wide": LAYERS["wide"]}, r=2, seed=2, dtype=torch.float64)
    merged, report = merge_adapters([a, b], [0.5, 2.0], method="cat")
    assert list(merged.modules) == ["lin", "c2", "wide"]
    torch.testing.assert_close(dense_delta(merged, "c2"), 0.5 * dense_delta(a, "c2"), **F64)
    torch.testing.assert_close(dense_delta(merged, "wide"), 2.0 * dense_delta(b, "wide"), **F64)
    torch.testing.assert_close(dense_delta(merged, "lin"), 0.5 * dense_delta(a, "lin") + 2 * dense_delta(b, "lin"),
                               **F64)
    cfg = merged.config
    assert set(cfg.target_modules) == {"lin", "c2", "wide"}
    assert [merged.modules[m].rank for m in merged.modules] == [6, 4, 2]
    assert cfg.r == 6 and cfg.lora_alpha == 6 and merged.problems() == []
    assert all(module_scale(merged, m) == 1.0 for m in merged.modules)
    rows = {r.module: r.ranks for r in report.modules}
    assert rows == {"lin": [4, 2], "c2": [4, None], "wide": [None, 2]}
    assert any("count as zero" in n for n in report.notes)
    # linear takes missing modules too (only the ranks present must agree)
    linear, _ = merge_adapters([a, make_adapter({"lin": LAYERS["lin"]}, r=4, seed=3, dtype=torch.float64)],
                               [0.5, 0.5], method="linear")
    assert set(linear.modules) == {"lin", "c2"}


def test_default_weights_rank_and_targets():
    a = make_adapter(r=4, rank_pattern={"lin": 6}, seed=1)
    b = make_adapter(r=2, seed=2)
    merged, report = merge_adapters([a, b])
    assert report.weights == [0.5, 0.5] and report.method == "svd"
    assert report.r == 6  # PEFT's default: the largest r or rank_pattern value
    assert merged.modules["lin"].rank == 6 and merged.modules["wide"].rank == 6
    assert merged.modules["c3"].rank == 4  # min(out, in) of a 4 x 16 conv
    assert merged.config.target_modules == a.config.target_modules
    assert merged.modules["lin"].A.dtype == torch.float32


def test_single_adapter_uses_the_method_asked_for():
    a = make_adapter({"wide": LAYERS["wide"]}, r=4, seed=1, dtype=torch.float64)
    merged, report = merge_adapters([a], [2.0], method="svd", r=2)
    torch.testing.assert_close(dense_delta(merged, "wide"), _best(2.0 * dense_delta(a, "wide"), 2), **F64)
    assert any("PEFT's add_weighted_adapter would switch to linear" in n for n in report.notes)


def test_dare_is_reproducible_per_module():
    a, b = _pair()
    one, r1 = merge_adapters([a, b], [0.5, 0.5], method="dare_ties", density=0.5, seed=3)
    two, _ = merge_adapters([a, b], [0.5, 0.5], method="dare_ties", density=0.5, seed=3)
    other, _ = merge_adapters([a, b], [0.5, 0.5], method="dare_ties", density=0.5, seed=4)
    assert r1.seed == 3
    for name in a.modules:
        assert torch.equal(one.modules[name].A, two.modules[name].A)
        assert not torch.equal(one.modules[name].A, other.modules[name].A)
    # a module's draws do not depend on the other modules
    lone, _ = merge_adapters([_only(a, "lin"), _only(b, "lin")], [0.5, 0.5], method="dare_ties", density=0.5, seed=3)
    assert torch.equal(lone.modules["lin"].B, one.modules["lin"].B)


def _only(adapter: Adapter, name: str) -> Adapter:
    cfg = adapter.config
    cfg2 = type(cfg)(r=cfg.r, lora_alpha=cfg.lora_alpha, target_modules=[name])
    return Adapter(cfg2, {name: adapter.modules[name]})


def test_modules_to_save_copies():
    head = {"head.weight": torch.ones(2, 2)}
    a = make_adapter({"lin": LAYERS["lin"]}, seed=1, modules_to_save=["head"], extra=head)
    b = make_adapter({"lin": LAYERS["lin"]}, seed=2)
    merged, report = merge_adapters([a, b])
    assert torch.equal(merged.extra["head.weight"], head["head.weight"]) and merged.config.modules_to_save == ["head"]
    assert any("taken unchanged from adapter 0" in n for n in report.notes)
    same = make_adapter({"lin": LAYERS["lin"]}, seed=2, modules_to_save=["head"], extra=dict(head))
    merge_adapters([a, same])  # identical copies are fine
    other = make_adapter({"lin": LAYERS["lin"]}, seed=2, modules_to_save=["head"], extra={"head.weight": torch.zeros(2, 2)})
    with pytest.raises(InputError, match=r"head.weight \(adapter 0 and adapter 1\).*all but one adapter"):
        merge_adapters([a, other])


def test_dora_is_refused_with_the_reason():
    a = make_adapter({"lin": LAYERS["lin"]}, seed=1, use_dora=True)
    b = make_adapter({"lin": LAYERS["lin"]}, seed=2)
    with pytest.raises(UnsupportedError, match=r"cannot merge DoRA adapters \(adapter 0\).*depends on the base weight W"):
        merge_adapters([a, b])


def test_different_bases_name_the_module_and_both_shapes():
    a = make_adapter({"lin": ("linear", (10, 12)), "c2": LAYERS["c2"]}, seed=1)
    b = make_adapter({"lin": ("linear", (10, 16)), "c2": ("linear", (5, 27))}, seed=2)
    with pytest.raises(InputError) as err:
        merge_adapters([a, b])
    text = str(err.value)
    assert "different base models: 2 module(s)" in text
    assert "lin: adapter 0 has linear 10x12 (lora_A (4, 12), lora_B (10, 4)) but adapter 1 has linear 10x16" in text
    assert "c2: adapter 0 has conv2d 5x3x3x3" in text and "adapter 1 has linear 5x27" in text


def test_fan_in_fan_out_disagreement():
    a = make_adapter({"lin": LAYERS["lin"]}, seed=1, fan_in_fan_out=True)
    b = make_adapter({"lin": LAYERS["lin"]}, seed=2)
    with pytest.raises(InputError, match="disagree on fan_in_fan_out"):
        merge_adapters([a, b])


@pytest.mark.parametrize("kwargs, message", [
    (dict(weights=[1.0]), r"1 weight\(s\) \[1.0\] for 2 adapters: give exactly one weight per adapter"),
    (dict(weights=[1.0, float("nan")]), "weights must be finite"),
    (dict(method="average"), "unknown merge method 'average'; use one of: svd, "),
    (dict(method="linear"), "needs every adapter to have the same rank on a module; these differ: lin "
                            r"\(adapter 0: r=4, adapter 1: r=2\).*Use --method svd"),
    (dict(method="ties"), r"method ties needs --density D"),
    (dict(method="ties", density=0.0), r"--density must be in \(0, 1\]"),
    (dict(method="dare_linear", density=1.5), r"--density must be in \(0, 1\]"),
    (dict(method="svd", density=0.5), "--density applies to the methods that trim or drop"),
    (dict(method="svd", majority_sign="total"), "--majority-sign applies to the methods that elect a sign"),
    (dict(method="ties", density=0.5, majority_sign="max"), "--majority-sign must be one of total, frequency"),
    (dict(method="svd", r=0), "--r must be an integer >= 1, got 0"),
    (dict(method="cat", r=4), "--r sets the new rank of the svd methods.*cat gives the sum of the input ranks"),
])
def test_bad_options(kwargs, message):
    a = make_adapter({"lin": LAYERS["lin"]}, r=4, seed=1)
    b = make_adapter({"lin": LAYERS["lin"]}, r=2, seed=2)
    weights = kwargs.pop("weights", None)
    with pytest.raises(ConfigError, match=message):
        merge_adapters([a, b], weights, **kwargs)


def test_one_adapter_for_a_sign_electing_method():
    a = make_adapter({"lin": LAYERS["lin"]}, seed=1)
    for method in [m for m, spec in METHODS.items() if spec.uses_sign]:
        with pytest.raises(ConfigError, match=f"method {method} elects a sign.*needs at least two adapters"):
            merge_adapters([a], method=method, density=0.5)
    merge_adapters([a], method="magnitude_prune", density=0.5)


def test_clamped_and_padded_ranks_are_said():
    a = make_adapter({"lin": LAYERS["lin"], "wide": LAYERS["wide"]}, r=1, seed=1)
    b = make_adapter({"lin": LAYERS["lin"], "wide": LAYERS["wide"]}, r=1, seed=2)
    merged, report = merge_adapters([a, b], method="svd", r=12)
    assert merged.modules["lin"].rank == 10 and merged.modules["wide"].rank == 9
    assert all(row.clamped and row.padded for row in report.modules)
    assert any("exceeds min(out, in)" in n for n in report.notes) and any("zero-padded" in n for n in report.notes)


def test_writes_atomically_and_checks_the_output_first(tmp_path):
    a = make_adapter({"lin": LAYERS["lin"]}, seed=1)
    b = make_adapter({"lin": LAYERS["lin"]}, seed=2)
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    report = merge_to_dir([tmp_path / "a", tmp_path / "b"], tmp_path / "m", [0.7, 0.3])
    loaded = Adapter.load(tmp_path / "m")
    assert loaded.modules["lin"].rank == 4 and report.output == str(tmp_path / "m")
    assert [i.source for i in report.inputs] == [str(tmp_path / "a"), str(tmp_path / "b")]
    with pytest.raises(OutputExistsError):  # before any adapter is read: the missing one is not reached
        merge_to_dir([tmp_path / "a", tmp_path / "missing"], tmp_path / "m")
    with pytest.raises(ConfigError, match="weight"):  # options before the output
        merge_to_dir([tmp_path / "a", tmp_path / "b"], tmp_path / "m", [1.0])
    with pytest.raises(InputError):
        merge_to_dir([tmp_path / "a", tmp_path / "missing"], tmp_path / "m2")
    assert not (tmp_path / "m2").exists()
    d = report.to_dict()
    assert d["settings"]["method"] == "svd" and d["totals"]["modules"] == 1 and len(d["inputs"]) == 2
