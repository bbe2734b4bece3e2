"""merge and rerank against PEFT 0.21.2.

* Parity: every deterministic ``combination_type`` of ``add_weighted_adapter`` on plain-LoRA inputs gives the same
  delta per module (1e-4 relative) on Linear, Embedding, Conv2d (3x3 and 1x1), GPT-2 Conv1D (fan_in_fan_out) and a
  Llama with rank/alpha patterns; the TIES/DARE primitives equal PEFT's ``merge_utils`` (DARE from the same RNG
  state draws the same masks).
* What lorasurg writes, PEFT reads as meant: merged and reranked adapters load with no missing or unexpected keys
  and PEFT computes the deltas lorasurg intended.
* Where PEFT is wrong, lorasurg is right against the dense definition: rsLoRA inputs (PEFT off by sqrt(r)),
  ``lora_bias`` (PEFT drops the bias deltas), DoRA (PEFT ignores the magnitudes; lorasurg refuses, saying why),
  Conv1d/Conv3d with the svd types (PEFT raises).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from peft.utils import merge_utils  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from lorasurg.engine.factors import LoraFactors, delta_weight, lora_scale  # noqa: E402
from lorasurg.engine.sparsify import TENSOR_METHODS  # noqa: E402
from lorasurg.errors import UnsupportedError  # noqa: E402
from lorasurg.io.adapter import Adapter  # noqa: E402
from lorasurg.surgery.merge import merge_adapters  # noqa: E402
from lorasurg.surgery.rerank import rerank  # noqa: E402
from tests.runtime.models import gpt2, llama, token_input  # noqa: E402

PARITY = 1e-4


class Net(nn.Module):
    """Embedding, Conv2d (3x3 and 1x1), Linear, Conv1d and Conv3d; forward uses the linear layers only."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.c2 = nn.Conv2d(8, 6, 3)
        self.p2 = nn.Conv2d(6, 6, 1)
        self.lin = nn.Linear(6, 10)
        self.out = nn.Linear(10, 4)
        self.c1 = nn.Conv1d(8, 6, 3)
        self.c3 = nn.Conv3d(6, 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.lin(x)))


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().eval()


NET = ["emb", "c2", "p2", "lin", "out"]
LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]
CASES = {
    "net": (net, dict(r=4, lora_alpha=8, target_modules=NET), dict(r=4, lora_alpha=4, target_modules=NET)),
    "net_ranks": (net, dict(r=4, lora_alpha=8, target_modules=NET), dict(r=2, lora_alpha=3, target_modules=NET)),
    "gpt2": (gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
             dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    "llama_patterns": (llama, dict(r=4, lora_alpha=8, target_modules=LLAMA, rank_pattern={"q_proj": 2},
                                   alpha_pattern={"v_proj": 3}),
                       dict(r=4, lora_alpha=2, target_modules=LLAMA, rank_pattern={"q_proj": 2},
                            alpha_pattern={"layers.1.mlp.up_proj": 8})),
}
DETERMINISTIC = [("svd", {}), ("svd", dict(svd_rank=3)), ("cat", {}), ("linear", {}), ("ties", dict(density=0.5)),
                 ("ties", dict(density=0.3, majority_sign_method="frequency")), ("ties_svd", dict(density=0.5)),
                 ("magnitude_prune", dict(density=0.5)), ("magnitude_prune_svd", dict(density=0.4))]
EQUAL_RANKS = {"linear", "ties", "magnitude_prune"}


def _peft_model(build, configs: list[dict], seed: int = 0):
    """A PeftModel with random (non-zero) adapters "default", "b", ... from ``configs``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed + 1)
        pm = peft.get_peft_model(build(), peft.LoraConfig(init_lora_weights=False, **configs[0]))
        for i, cfg in enumerate(configs[1:]):
            torch.manual_seed(seed + 2 + i)
            pm.add_adapter("b" if i == 0 else f"c{i}", peft.LoraConfig(init_lora_weights=False, **cfg))
    return pm.eval()


def _saved(pm, directory: Path) -> list[Adapter]:
    """Save every adapter of ``pm`` with PEFT and read them back with lorasurg, in the order they were added."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(directory)
    names = list(pm.peft_config)
    return [Adapter.load(directory if n == "default" else directory / n) for n in names]


def _lora_layers(pm, adapter_name: str):
    for name, layer in pm.base_model.model.named_modules():
        if isinstance(layer, peft.tuners.lora.LoraLayer) and (
                adapter_name in layer.lora_A or adapter_name in layer.lora_embedding_A):
            yield name, layer


def _our_delta(adapter: Adapter, module: str, weight_shape) -> torch.Tensor:
    mod = adapter.modules[module]
    r, alpha = adapter.rank_alpha(module)
    f = LoraFactors(mod.kind, mod.A.double(), mod.B.double(), lora_scale(r, alpha, adapter.config.use_rslora),
                    fan_in_fan_out=adapter.config.fan_in_fan_out and mod.kind == "linear")
    return delta_weight(f, tuple(weight_shape))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def _merge_both(pm, adapters, method, kwargs, weights, merged_name):
    """PEFT's add_weighted_adapter into ``merged_name`` and lorasurg's merge_adapters of the same inputs."""
    peft_kwargs = dict(kwargs)
    ours_kwargs = {"r": peft_kwargs.get("svd_rank"), "density": peft_kwargs.get("density"),
                   "majority_sign": peft_kwargs.get("majority_sign_method")}
    with torch.no_grad():
        pm.add_weighted_adapter(["default", "b"][: len(adapters)], weights, merged_name, combination_type=method,
                                **peft_kwargs)
    ours, _ = merge_adapters(adapters, weights, method=method, **{k: v for k, v in ours_kwargs.items() if v is not None})
    return ours


_PAIRS: dict = {}


def _pair(case: str, tmp_path_factory):
    """The PEFT model with adapters "default" and "b" of ``case`` and lorasurg's reading of them (built once)."""
    if case not in _PAIRS:
        build, cfg_a, cfg_b = CASES[case]
        pm = _peft_model(build, [cfg_a, cfg_b])
        _PAIRS[case] = pm, _saved(pm, tmp_path_factory.mktemp(case))
    return _PAIRS[case]


# unequal ranks ("net_ranks") only for the methods that take them (PEFT and lorasurg refuse the factor-wise ones)
PARITY_CASES = [pytest.param(case, method, kwargs, id=f"{case}-{method}-{'-'.join(map(str, kwargs.values()))}")
                for case in sorted(CASES) for method, kwargs in DETERMINISTIC
                if not (method in EQUAL_RANKS and case == "net_ranks")]


@pytest.mark.parametrize("case, method, kwargs", PARITY_CASES)
def test_deterministic_methods_match_peft(tmp_path_factory, case, method, kwargs):
    pm, adapters = _pair(case, tmp_path_factory)
    merged_name = f"merged{len(pm.peft_config)}"
    ours = _merge_both(pm, adapters, method, kwargs, [0.7, 0.4], merged_name)
    checked = 0
    for name, layer in _lora_layers(pm, merged_name):
        theirs = layer.get_delta_weight(merged_name)
        mine = _our_delta(ours, name, layer.get_base_layer().weight.shape)
        assert _rel(mine, theirs) < PARITY, (name, _rel(mine, theirs))
        checked += 1
    assert checked == len(ours.modules)


def test_merged_adapter_loads_in_peft_as_meant(tmp_path):
    """Different ranks, rank patterns and modules missing from one input: the merged (cat) adapter loads with no
    missing or unexpected keys and PEFT's delta for every module is the exact weighted sum of the inputs'."""
    targets_b = ["q_proj", "v_proj", "down_proj"]
    pm = _peft_model(llama, [dict(r=4, lora_alpha=8, target_modules=LLAMA, rank_pattern={"k_proj": 2}),
                             dict(r=3, lora_alpha=5, target_modules=targets_b, use_rslora=True)])
    a, b = _saved(pm, tmp_path / "in")
    merged, _ = merge_adapters([a, b], [0.6, -0.5], method="cat")
    merged.save(tmp_path / "m")
    loaded = _load_in_peft(llama(), tmp_path / "m")
    for name, layer in _lora_layers(loaded, "default"):
        shape = layer.get_base_layer().weight.shape
        expected = 0.6 * _our_delta(a, name, shape)
        if name in b.modules:
            expected = expected - 0.5 * _our_delta(b, name, shape)
        assert _rel(layer.get_delta_weight("default"), expected) < PARITY, name


def _load_in_peft(model, directory: Path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(model, directory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT takes a 1-D lora_B.bias for an ungathered ZeRO-3 shard
        expected = set(peft.get_peft_model_state_dict(pm, save_embedding_layers=False))
    stored = set(load_file(str(directory / "adapter_model.safetensors")))
    stored = {k for k in stored if not k.endswith("base_layer.weight")}
    assert expected == stored, (sorted(expected - stored), sorted(stored - expected))
    assert not any("missing adapter keys" in str(w.message).lower() for w in caught)
    return pm.eval()


@pytest.mark.parametrize("cfg", [dict(r=6, lora_alpha=12, target_modules=LLAMA),
                                 dict(r=6, lora_alpha=4, target_modules=LLAMA, use_rslora=True,
                                      rank_pattern={"q_proj": 4}, alpha_pattern={"layers.0.mlp.up_proj": 9}),
                                 dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)])
def test_rerank_loads_in_peft_as_meant(tmp_path, cfg):
    """PEFT reads the reranked adapter's per-module rank and scale as meant: its delta is the optimal rank-2
    truncation of the original (dense float64 SVD); equal rank gives PEFT's original outputs."""
    pm = _peft_model(llama, [cfg])
    (adapter,) = _saved(pm, tmp_path / "in")
    x = token_input()
    with torch.no_grad():
        reference = pm(x).logits
    same, _ = rerank(adapter, r=adapter.config.r)
    same.save(tmp_path / "same")
    with torch.no_grad():
        torch.testing.assert_close(_load_in_peft(llama(), tmp_path / "same")(x).logits, reference)
    low, _ = rerank(adapter, r=2)
    low.save(tmp_path / "low")
    loaded = _load_in_peft(llama(), tmp_path / "low")
    for name, layer in _lora_layers(loaded, "default"):
        original = _our_delta(adapter, name, layer.get_base_layer().weight.shape)
        U, S, Vh = torch.linalg.svd(original.T if "embed" in name else original, full_matrices=False)
        best = (U[:, :2] * S[:2]) @ Vh[:2]
        best = best.T if "embed" in name else best
        assert _rel(layer.get_delta_weight("default"), best) < PARITY, name
        if cfg.get("use_dora"):
            assert torch.equal(layer.lora_magnitude_vector["default"].weight.detach(), adapter.modules[name].magnitude)


# ------------------------------------------------------------------------------------ where PEFT is wrong


def _self_merge(tmp_path, cfg, build=llama):
    """One adapter merged with itself at weights 0.5, 0.5 by svd: by definition the adapter itself."""
    pm = _peft_model(build, [cfg])
    (adapter,) = _saved(pm, tmp_path / "in")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lora_bias on bias-less layers: PEFT warns that it cannot merge them
        pm.add_weighted_adapter(["default", "default"], [0.5, 0.5], "merged", combination_type="svd")
    return pm, adapter


def test_rslora_peft_is_off_by_sqrt_r_lorasurg_is_exact(tmp_path):
    pm, adapter = _self_merge(tmp_path, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True))
    ours, _ = merge_adapters([adapter, adapter], [0.5, 0.5], method="svd")
    for name, layer in _lora_layers(pm, "merged"):
        shape = layer.get_base_layer().weight.shape
        truth = _our_delta(adapter, name, shape)
        assert _rel(layer.get_delta_weight("merged") / 2.0, truth) < PARITY  # PEFT: sqrt(4) times the definition
        assert _rel(_our_delta(ours, name, shape), truth) < PARITY


def test_lora_bias_peft_drops_it_lorasurg_adds_it(tmp_path):
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_bias=True)
    pm, adapter = _self_merge(tmp_path, cfg)
    ours, _ = merge_adapters([adapter, adapter], [0.5, 0.5], method="svd")
    for name, layer in _lora_layers(pm, "merged"):
        truth = layer.lora_B["default"].bias.detach().double() * layer.scaling["default"]
        theirs = layer.lora_B["merged"].bias.detach().double() * layer.scaling["merged"]
        assert _rel(theirs, truth) > 0.5  # PEFT's merged bias has nothing to do with the inputs'
        mine = ours.modules[name].bias.double() * lora_scale(*ours.rank_alpha(name))
        assert _rel(mine, truth) < PARITY
    ours.save(tmp_path / "m")
    x = token_input()
    with torch.no_grad():
        pm.set_adapter("default")
        reference = pm(x).logits
        torch.testing.assert_close(_load_in_peft(llama(), tmp_path / "m")(x).logits, reference, rtol=1e-4, atol=1e-5)


def test_dora_peft_ignores_magnitudes_lorasurg_refuses(tmp_path):
    pm, adapter = _self_merge(tmp_path, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True))
    x = token_input()
    with torch.no_grad():
        base = pm.get_base_model()
        pm.set_adapter("default")
        reference = pm(x).logits
        pm.set_adapter("merged")
        merged = pm(x).logits
        with pm.disable_adapter():
            plain = pm(x).logits
    assert _rel(merged - plain, reference - plain) > 0.05  # PEFT's self-merge is not the adapter
    assert base is not None
    with pytest.raises(UnsupportedError, match="cannot merge DoRA adapters.*depends on the base weight"):
        merge_adapters([adapter, adapter], [0.5, 0.5], method="svd")


@pytest.mark.parametrize("method", ["svd", "ties_svd"])
def test_conv1d_conv3d_peft_svd_breaks_lorasurg_matches_the_definition(tmp_path, method):
    targets = ["c1", "c3"]
    pm = _peft_model(net, [dict(r=2, lora_alpha=4, target_modules=targets),
                           dict(r=3, lora_alpha=3, target_modules=targets)])
    a, b = _saved(pm, tmp_path / "in")
    with pytest.raises(RuntimeError, match="size mismatch"):
        pm.add_weighted_adapter(["default", "b"], [0.7, 0.3], "merged", combination_type=method, density=0.5)
    ours, _ = merge_adapters([a, b], [0.7, 0.3], method=method, r=2, **({"density": 0.5} if "ties" in method else {}))
    for name, layer in _lora_layers(pm, "default"):
        shape = layer.get_base_layer().weight.shape
        deltas = [layer.get_delta_weight(n).double().reshape(shape[0], -1) for n in ("default", "b")]
        combined = (TENSOR_METHODS["ties"](deltas, [0.7, 0.3], 0.5, "total", None) if method == "ties_svd"
                    else 0.7 * deltas[0] + 0.3 * deltas[1])
        U, S, Vh = torch.linalg.svd(combined, full_matrices=False)
        best = ((U[:, :2] * S[:2]) @ Vh[:2]).reshape(shape)
        assert _rel(_our_delta(ours, name, shape), best) < PARITY, name


# ------------------------------------------------------------------------------------ primitives


@pytest.mark.parametrize("method", ["ties", "magnitude_prune"])
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_trimming_primitives_match_peft(method, sign, gen):
    tensors = [torch.randn(30, 20, generator=gen) for _ in range(3)]
    weights = torch.tensor([0.5, -1.0, 2.0])
    theirs = (merge_utils.ties(tensors, weights, 0.3, sign) if method == "ties"
              else merge_utils.magnitude_prune(tensors, weights, 0.3))
    ours = TENSOR_METHODS[method](tensors, weights.tolist(), 0.3, sign, None)
    assert torch.equal(ours != 0, theirs != 0)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_from_the_same_rng_state_draws_peft_masks(method, gen):
    tensors = [torch.randn(40, 25, generator=gen) for _ in range(2)]
    weights = torch.tensor([0.7, 0.3])
    torch.manual_seed(11)
    theirs = (merge_utils.dare_linear(tensors, weights, 0.4) if method == "dare_linear"
              else merge_utils.dare_ties(tensors, weights, 0.4, "total"))
    ours = TENSOR_METHODS[method](tensors, weights.tolist(), 0.4, "total", torch.Generator().manual_seed(11))
    assert torch.equal(ours != 0, theirs != 0)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_peft_lists_the_same_combination_types():
    import inspect
    import re

    from lorasurg.engine.combine import METHODS

    hint = inspect.signature(peft.tuners.lora.LoraModel.add_weighted_adapter).parameters["combination_type"]
    names = set(re.findall(r"['\"](\w+)['\"]", str(hint.annotation)))
    assert names == set(METHODS)
