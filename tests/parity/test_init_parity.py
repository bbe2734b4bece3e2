"""lorasurg's initialisations against PEFT 0.21.2's on the same weights and the same RNG state.

Exactness: PEFT draws every random init from torch's global RNG, in a fixed order (the default inits of the
lora_A/lora_B modules it builds, then the method's own draws). ``init_factors`` makes the same draws in the same
order, so after ``torch.manual_seed(s)`` for PEFT and ``generator=torch.Generator().manual_seed(s)`` for lorasurg,
the tensors that are RNG draws, scaled draws or copies (True, False, gaussian, every embedding and conv init, the
untouched base weights) are asserted equal bit for bit: that holds on every machine.

Orthogonal, PiSSA and OLoRA also go through QR, SVD and matmul kernels. lorasurg runs PEFT's ops in PEFT's order on
the same layouts (see :mod:`lorasurg.engine.init`), so on one machine they agree bit for bit too, but the claim
rests on kernel rounding, which differs between CPUs; they are asserted within a bound derived from the
computation (:func:`_assert_close_kernel`).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lorasurg.engine.factors import delta_weight
from lorasurg.engine.init import init_factors
from tests.conftest import assert_close_ulps

peft = pytest.importorskip("peft")
Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D

pytestmark = pytest.mark.parity

R, ALPHA, SEED = 4, 8, 1234
SCALE = ALPHA / R


class _Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _peft_layer(layer: nn.Module, init, *, fan_in_fan_out: bool = False, lora_bias: bool = False):
    """PEFT's LoRA layer for ``layer`` after ``torch.manual_seed(SEED)``."""
    config = peft.LoraConfig(target_modules=["layer"], r=R, lora_alpha=ALPHA, init_lora_weights=init,
                             fan_in_fan_out=fan_in_fan_out, lora_bias=lora_bias)
    torch.manual_seed(SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(_Holder(layer), config).base_model.model.layer


def _peft_tensors(wrapped: nn.Module):
    """(A, B, bias, base weight) of a PEFT LoRA layer in its stored layout."""
    if "default" in wrapped.lora_embedding_A:
        return wrapped.lora_embedding_A["default"], wrapped.lora_embedding_B["default"], None, wrapped.base_layer.weight
    bias = wrapped.lora_B["default"].bias
    return (wrapped.lora_A["default"].weight, wrapped.lora_B["default"].weight, bias, wrapped.base_layer.weight)


def _ours(init, kind, weight, *, fan_in_fan_out=False, lora_bias=False):
    return init_factors(init, kind, tuple(weight.shape), R, SCALE, weight=weight.detach().clone(),
                        fan_in_fan_out=fan_in_fan_out, lora_bias=lora_bias,
                        generator=torch.Generator().manual_seed(SEED))


KERNEL_INITS = ("orthogonal", "pissa", "pissa_niter_2", "pissa_niter_3", "olora")  # QR / SVD / matmul results


def _assert_same(wrapped: nn.Module, ours, original_weight: torch.Tensor, init=None) -> None:
    A, B, bias, base = _peft_tensors(wrapped)
    if bias is None:
        assert ours.factors.bias is None
    else:
        assert torch.equal(bias.detach(), ours.factors.bias)  # an RNG draw (or zeros)
    if init in KERNEL_INITS and ours.factors.kind != "embedding":  # PEFT's embedding init is RNG draws only
        _assert_close_kernel(A.detach(), B.detach(), base.detach(), ours, original_weight)
        return
    assert torch.equal(A.detach(), ours.factors.A)
    assert torch.equal(B.detach(), ours.factors.B)
    expected_base = original_weight if ours.residual_weight is None else ours.residual_weight
    assert torch.equal(base.detach(), expected_base)


def _assert_close_kernel(A, B, base, ours, original_weight) -> None:
    """PEFT's A, B and base weight against ours, for inits whose values come from QR/SVD/matmul kernels.

    Bounds: A and B come from the same Householder QR or SVD of the same float32 matrix. Those are backward
    stable with a backward error of order ``min(m, n) * eps * ||W||`` (Higham, ch. 19), so two kernels that block
    differently can differ by that much: within ``8 * min(m, n)`` ulps of the tensor's largest entry. The residual
    ``W - s * B @ A`` inherits that (``s * (|dB| |A| + |B| |dA|)``) plus the rounding of an r-term dot product and
    a subtraction, ``(r + 1) eps/2 (|W| + |s B| @ |A|)`` per evaluation: within ``16 * min(m, n) + 2 * (r + 1)``
    ulps of ``|W| + |s B| @ |A|``, elementwise. Orthogonal's base weight is untouched, so it stays exact.
    """
    m, n = ours.factors.B.shape[0], ours.factors.A.shape[-1]  # (out, r), (r, in)
    factor_ulps = 8 * min(m, n)
    for name, theirs, mine in (("A", A, ours.factors.A), ("B", B, ours.factors.B)):
        assert_close_ulps(mine, theirs, factor_ulps, magnitude=float(theirs.abs().max()), msg=name)
    if ours.residual_weight is None:
        assert torch.equal(base, original_weight)
        return
    s, f = ours.factors.scale, ours.factors
    size = (s * B.abs()) @ A.abs()  # (out, r) @ (r, in) -> (out, in): the residual's operand scale
    size = original_weight.abs() + (size.T if f.fan_in_fan_out else size)
    assert_close_ulps(ours.residual_weight, base, 2 * factor_ulps + 2 * (R + 1), magnitude=size, msg="residual")


def _linear(in_features=10, out_features=6) -> nn.Linear:
    torch.manual_seed(7)
    return nn.Linear(in_features, out_features)


LINEAR_INITS = [True, False, "gaussian", "orthogonal", "pissa", "pissa_niter_2", "olora"]


@pytest.mark.parametrize("init", LINEAR_INITS)
@pytest.mark.parametrize("shape", [(10, 6), (6, 10)])
def test_linear_equals_peft_bit_for_bit(init, shape):
    layer = _linear(*shape)
    weight = layer.weight.detach().clone()
    _assert_same(_peft_layer(layer, init), _ours(init, "linear", weight), weight, init)


@pytest.mark.parametrize("init", [True, False])
def test_linear_lora_bias_equals_peft(init):
    layer = _linear()
    weight = layer.weight.detach().clone()
    _assert_same(_peft_layer(layer, init, lora_bias=True), _ours(init, "linear", weight, lora_bias=True), weight)


@pytest.mark.parametrize("init", [True, False, "gaussian", "orthogonal", "pissa", "pissa_niter_3"])
def test_gpt2_conv1d_equals_peft(init):
    torch.manual_seed(7)
    layer = Conv1D(12, 8)  # weight (in=8, out=12)
    weight = layer.weight.detach().clone()
    wrapped = _peft_layer(layer, init, fan_in_fan_out=True)
    _assert_same(wrapped, _ours(init, "linear", weight, fan_in_fan_out=True), weight, init)


@pytest.mark.parametrize("init", [True, False, "gaussian", "orthogonal", "pissa", "olora"])
def test_embedding_equals_peft(init):
    """PEFT gives an embedding A = 0, B ~ N(0, 1) for every truthy method and leaves its weight alone."""
    torch.manual_seed(7)
    layer = nn.Embedding(30, 6)
    weight = layer.weight.detach().clone()
    ours = _ours(init, "embedding", weight)
    _assert_same(_peft_layer(layer, init), ours, weight, init)
    assert ours.residual_weight is None


@pytest.mark.parametrize("make, weight_kind", [(lambda: nn.Conv1d(3, 6, 5), "conv1d"),
                                               (lambda: nn.Conv2d(3, 6, 3), "conv2d"),
                                               (lambda: nn.Conv3d(2, 4, (2, 3, 2)), "conv3d")])
@pytest.mark.parametrize("init", [True, False, "gaussian"])
def test_conv_equals_peft(make, weight_kind, init):
    torch.manual_seed(7)
    conv = make()
    weight = conv.weight.detach().clone()
    _assert_same(_peft_layer(conv, init), _ours(init, weight_kind, weight), weight)


@pytest.mark.parametrize("init", ["pissa", "olora", "orthogonal"])
def test_peft_refuses_base_inits_on_conv_and_we_do_not(init):
    """PEFT 0.21.2 raises for PiSSA/OLoRA/orthogonal on a conv layer; lorasurg uses the flattened kernel."""
    torch.manual_seed(7)
    conv = nn.Conv2d(3, 6, 3)
    with pytest.raises(ValueError, match="Unknown initialization"):
        _peft_layer(conv, init)
    weight = conv.weight.detach().clone()
    ours = _ours(init, "conv2d", weight)
    assert "PEFT 0.21.2 refuses" in ours.note
    if ours.residual_weight is not None:
        torch.testing.assert_close(ours.residual_weight + delta_weight(ours.factors, weight.shape), weight)


def test_peft_olora_skips_the_fan_in_fan_out_transpose():
    """PEFT's OLoRA on a GPT-2 Conv1D factors the stored (in, out) weight instead of the (out, in) matrix.

    Square layer: shapes happen to fit, but the adapted layer no longer computes the base layer's output at init.
    Non-square layer: lora_B gets shape (in, r) instead of (out, r). lorasurg follows the definition: the output is
    unchanged and the shapes are right.
    """
    torch.manual_seed(7)
    square = Conv1D(8, 8)
    x = torch.randn(3, 8)
    expected = square(x).detach()
    weight = square.weight.detach().clone()
    wrapped = _peft_layer(square, "olora", fan_in_fan_out=True)
    peft_error = float((wrapped(x).detach() - expected).abs().max())
    assert peft_error > 1e-2  # PEFT's bug: the init changes the layer's output

    ours = _ours("olora", "linear", weight, fan_in_fan_out=True)
    adapted = x @ ours.residual_weight + square.bias.detach() + SCALE * (x @ ours.factors.A.T) @ ours.factors.B.T
    torch.testing.assert_close(adapted, expected, rtol=1e-5, atol=1e-5)

    torch.manual_seed(7)
    wide = Conv1D(12, 8)  # (in=8, out=12)
    wrapped = _peft_layer(wide, "olora", fan_in_fan_out=True)
    assert tuple(wrapped.lora_B["default"].weight.shape) == (8, R)  # PEFT: (in, r), should be (out, r)
    ours = _ours("olora", "linear", wide.weight.detach().clone(), fan_in_fan_out=True)
    assert tuple(ours.factors.B.shape) == (12, R) and tuple(ours.factors.A.shape) == (R, 8)
