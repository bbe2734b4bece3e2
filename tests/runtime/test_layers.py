"""LoRA wrappers against the definition: forward, DoRA, dropout, merge/unmerge, for every layer kind."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorasurg.errors import UnsupportedError
from lorasurg.runtime.layers import LoraConv, LoraEmbedding, LoraLinear, wrap_layer
from tests.conftest import tol

# name -> (layer factory, input factory)
LAYERS = {
    "linear": (lambda: nn.Linear(6, 5), lambda g: torch.randn(3, 4, 6, generator=g)),
    "linear_nobias": (lambda: nn.Linear(6, 5, bias=False), lambda g: torch.randn(3, 6, generator=g)),
    "gpt2_conv1d": (lambda: Conv1D(5, 6), lambda g: torch.randn(3, 4, 6, generator=g)),
    "embedding": (lambda: nn.Embedding(11, 5, padding_idx=0), lambda g: torch.randint(0, 11, (3, 4), generator=g)),
    "conv1d": (lambda: nn.Conv1d(4, 5, 3, padding=1), lambda g: torch.randn(2, 4, 7, generator=g)),
    "conv2d_strided": (lambda: nn.Conv2d(4, 5, 3, stride=2, padding=1), lambda g: torch.randn(2, 4, 7, 7, generator=g)),
    "conv2d_dilated": (lambda: nn.Conv2d(4, 5, 3, dilation=2, bias=False), lambda g: torch.randn(2, 4, 9, 9, generator=g)),
    "conv3d": (lambda: nn.Conv3d(3, 4, 2), lambda g: torch.randn(2, 3, 4, 4, 4, generator=g)),
    "conv3d_1x1x1": (lambda: nn.Conv3d(3, 4, 1), lambda g: torch.randn(2, 3, 3, 3, 3, generator=g)),
}


def _layer(name: str, *, use_dora: bool = False, lora_bias: bool = False, r: int = 3, dropout: float = 0.0):
    torch.manual_seed(0)
    base = LAYERS[name][0]()
    layer = wrap_layer(copy.deepcopy(base))
    layer.add_adapter("a", r, 6.0, 2.0, dropout=dropout, lora_bias=lora_bias, use_dora=use_dora)
    g = torch.Generator().manual_seed(1)
    A, B, bias = layer._ab("a")
    with torch.no_grad():
        A.copy_(torch.randn(A.shape, generator=g) * 0.3)
        B.copy_(torch.randn(B.shape, generator=g) * 0.3)
        if bias is not None:
            bias.copy_(torch.randn(bias.shape, generator=g))
        if use_dora:
            layer.reset_magnitude("a")
            mag = layer.lora_magnitude_vector["a"].weight
            mag.mul_(1 + 0.2 * torch.rand(mag.shape, generator=g))
    layer.active_adapters = ["a"]
    return base, layer, LAYERS[name][1](torch.Generator().manual_seed(2))


def _reference_weight(layer, base: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W + scale * B @ A (DoRA: rows rescaled to the magnitude) and the adapted bias, in float64, by hand."""
    A, B, bias = (None if t is None else t.detach().double() for t in layer._ab("a"))
    W = base.weight.detach().double()
    s = layer.scaling["a"]
    if isinstance(layer, LoraEmbedding):
        rows = W.T + s * B @ A  # (dim, num)
    elif isinstance(layer, LoraConv):
        rows = W.reshape(W.shape[0], -1) + s * B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1)  # (out, in*k)
    elif layer.info.fan_in_fan_out:
        rows = W.T + s * B @ A  # Conv1D stores (in, out)
    else:
        rows = W + s * B @ A
    if "a" in layer.lora_magnitude_vector:
        m = layer.lora_magnitude_vector["a"].weight.detach().double().reshape(-1)
        rows = rows * (m / rows.norm(dim=1))[:, None]
    if isinstance(layer, LoraConv):
        new_W = rows.reshape(W.shape)
    elif isinstance(layer, LoraEmbedding) or layer.info.fan_in_fan_out:
        new_W = rows.T
    else:
        new_W = rows
    b = getattr(base, "bias", None)
    b = None if b is None else b.detach().double()
    if bias is not None:
        b = (torch.zeros(rows.shape[0], dtype=torch.float64) if b is None else b) + s * bias
    return new_W, b


def _forward_with(base: nn.Module, weight: torch.Tensor, bias, x: torch.Tensor) -> torch.Tensor:
    ref = copy.deepcopy(base).double()
    with torch.no_grad():
        ref.weight.copy_(weight)
        if bias is not None:
            ref.bias = nn.Parameter(bias)
    return ref(x if not x.is_floating_point() else x.double())


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_forward_equals_base_with_adapted_weight(name, use_dora):
    base, layer, x = _layer(name, use_dora=use_dora)
    weight, bias = _reference_weight(layer, base)
    expected = _forward_with(base, weight, bias, x)
    torch.testing.assert_close(layer(x).double(), expected, **tol(torch.float32))


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_merge_matches_forward_and_unmerge_restores(name, use_dora):
    lora_bias = use_dora is False and name != "embedding"
    base, layer, x = _layer(name, use_dora=use_dora, lora_bias=lora_bias)
    before = layer(x)
    layer.merge()
    assert layer.merged_adapters == ["a"]
    torch.testing.assert_close(layer(x), before, **tol(torch.float32))
    torch.testing.assert_close(layer.base_layer(x), before, **tol(torch.float32))
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, base.weight, **tol(torch.float32))
    if getattr(base, "bias", None) is None:
        assert layer.bias is None  # a bias created by the merge is removed again
    else:
        torch.testing.assert_close(layer.base_layer.bias, base.bias, **tol(torch.float32))
    torch.testing.assert_close(layer(x), before, **tol(torch.float32))


def test_lora_bias_merge_creates_bias_on_bias_less_layer():
    base, layer, x = _layer("linear_nobias", lora_bias=True)
    layer.merge()
    expected = layer.scaling["a"] * layer.lora_B["a"].bias
    torch.testing.assert_close(layer.base_layer.bias, expected.detach())
    assert not layer.base_layer.bias.requires_grad


def test_dropout_applies_to_lora_input_in_training_only():
    base, layer, x = _layer("linear", dropout=0.5)
    layer.train()
    torch.manual_seed(5)
    got = layer(x)
    torch.manual_seed(5)
    dropped = F.dropout(x, 0.5, training=True)
    s = layer.scaling["a"]
    expected = base(x) + s * dropped @ layer.lora_A["a"].weight.T @ layer.lora_B["a"].weight.T
    torch.testing.assert_close(got, expected, **tol(torch.float32))
    layer.eval()
    expected_eval = base(x) + s * x @ layer.lora_A["a"].weight.T @ layer.lora_B["a"].weight.T
    torch.testing.assert_close(layer(x), expected_eval, **tol(torch.float32))


def test_dora_with_dropout_recomputes_base_on_dropped_input():
    base, layer, x = _layer("linear", use_dora=True, dropout=0.5)
    layer.train()
    torch.manual_seed(5)
    got = layer(x)
    torch.manual_seed(5)
    xd = F.dropout(x, 0.5, training=True)
    W, A, B = base.weight, layer.lora_A["a"].weight, layer.lora_B["a"].weight
    s, m = layer.scaling["a"], layer.lora_magnitude_vector["a"].weight
    f = m / (W + s * B @ A).norm(dim=1)  # (out,)
    expected = base(x) + (f - 1) * (xd @ W.T) + f * s * (xd @ A.T @ B.T)
    torch.testing.assert_close(got, expected, **tol(torch.float32))


def test_dora_gradient_skips_the_norm_but_reaches_magnitude_and_factors():
    _, layer, x = _layer("linear", use_dora=True)
    layer(x).sum().backward()
    for p in (layer.lora_A["a"].weight, layer.lora_B["a"].weight, layer.lora_magnitude_vector["a"].weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_embed_scale_scales_the_lora_term():
    base, layer, x = _layer("embedding")
    plain = layer(x) - base(x)
    layer.base_layer.embed_scale = 3.0
    base.embed_scale = 3.0  # nn.Embedding ignores it; a scaled embedding applies it in its forward
    torch.testing.assert_close(layer(x) - base(x), 3.0 * plain)


def test_disabled_or_inactive_layer_is_the_base_layer():
    base, layer, x = _layer("conv2d_strided")
    layer.merge()
    layer.disabled = True
    torch.testing.assert_close(layer(x), base(x))  # disabling unmerges first
    assert not layer.merged
    layer.disabled = False
    layer.active_adapters = []
    torch.testing.assert_close(layer(x), base(x))


def test_bfloat16_layer_keeps_dtype():
    base, layer, x = _layer("linear")
    layer = layer.to(torch.bfloat16)
    out = layer(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and layer.lora_A["a"].weight.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), layer.float()(x), **tol(torch.bfloat16))


def test_wrapper_forwards_attributes_of_the_base_layer():
    _, layer, _ = _layer("gpt2_conv1d")
    assert isinstance(layer, LoraLinear) and layer.nf == 5 and layer.weight is layer.base_layer.weight


def test_grouped_conv_and_attention_get_their_wrappers_and_other_modules_are_refused():
    from lorasurg.runtime.attention import LoraMultiheadAttention
    from lorasurg.runtime.grouped_conv import GroupedLoraConv

    assert isinstance(wrap_layer(nn.Conv2d(4, 4, 3, groups=2)), GroupedLoraConv)
    assert isinstance(wrap_layer(nn.MultiheadAttention(4, 2)), LoraMultiheadAttention)
    with pytest.raises(UnsupportedError, match="LayerNorm"):
        wrap_layer(nn.LayerNorm(4))


def test_lora_bias_on_embedding_is_refused():
    layer = wrap_layer(nn.Embedding(5, 3))
    with pytest.raises(UnsupportedError, match="lora_bias"):
        layer.add_adapter("a", 2, 2, 1.0, lora_bias=True)
