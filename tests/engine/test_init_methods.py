"""LoRA initialisation: invariants of every method on every layer kind, and every refusal's message."""

from __future__ import annotations

import math

import pytest
import torch

from lorasurg.engine.factors import delta_weight, weight_to_matrix
from lorasurg.engine.init import INIT_METHODS, InitMethod, init_factors, make_init_draws, parse_init_method
from lorasurg.errors import ConfigError, ShapeMismatchError, UnsupportedError
from tests.conftest import tol

LAYERS = [  # kind, weight shape, fan_in_fan_out
    ("linear", (12, 20), False),
    ("linear", (20, 12), True),  # GPT-2 Conv1D: stored (in, out)
    ("conv1d", (10, 3, 5), False),
    ("conv2d", (10, 3, 3, 3), False),
    ("conv3d", (8, 2, 2, 3, 2), False),
]


def _seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kind, shape, fifo", LAYERS)
@pytest.mark.parametrize("method", ["pissa", "pissa_niter_3", "olora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_residual_plus_delta_is_the_weight(kind, shape, fifo, method, dtype, gen):
    weight = torch.randn(shape, generator=gen).to(dtype)
    result = init_factors(method, kind, shape, 4, 0.5, weight=weight, fan_in_fan_out=fifo, generator=_seeded())
    assert result.residual_weight.shape == weight.shape and result.residual_weight.dtype == dtype
    restored = result.residual_weight.to(torch.float64) + delta_weight(result.factors, shape, torch.float64)
    torch.testing.assert_close(restored, weight.to(torch.float64), **tol(dtype))
    assert result.factors.kind == kind and result.factors.rank == 4 and result.factors.scale == 0.5


@pytest.mark.parametrize("kind, shape, fifo", LAYERS)
def test_pissa_takes_the_principal_part(kind, shape, fifo, gen):
    """scale * B @ A is the best rank-r approximation: the residual's norm is the tail of the spectrum."""
    weight = torch.randn(shape, generator=gen, dtype=torch.float64)
    S = torch.linalg.svdvals(weight_to_matrix(weight, kind, fifo))
    result = init_factors("pissa", kind, shape, 3, 2.0, weight=weight, fan_in_fan_out=fifo)
    assert float(result.residual_weight.norm()) == pytest.approx(float(S[3:].pow(2).sum().sqrt()), rel=1e-10)
    A, B = result.factors.A.reshape(3, -1), result.factors.B.reshape(-1, 3)
    # balanced: both factors carry sqrt(S / scale)
    torch.testing.assert_close(A.norm(dim=1), (S[:3] / 2.0).sqrt(), **tol(torch.float64))
    torch.testing.assert_close(B.norm(dim=0), (S[:3] / 2.0).sqrt(), **tol(torch.float64))


def test_olora_on_gpt2_conv1d_follows_the_definition(gen):
    """OLoRA of a fan_in_fan_out weight W: (in, out) factors the matrix view W.T: (out, in) (PEFT does not)."""
    n_in, n_out, r, scale = 6, 9, 3, 1.5
    weight = torch.randn(n_in, n_out, generator=gen, dtype=torch.float64)
    result = init_factors("olora", "linear", (n_in, n_out), r, scale, weight=weight, fan_in_fan_out=True)
    Q, R = torch.linalg.qr(weight.T)  # (out, in) = (out, p) (p, in)
    assert result.factors.A.shape == (r, n_in) and result.factors.B.shape == (n_out, r)
    torch.testing.assert_close(result.factors.B, Q[:, :r], **tol(torch.float64))
    torch.testing.assert_close(result.factors.A, R[:r], **tol(torch.float64))
    torch.testing.assert_close(result.residual_weight, (weight.T - scale * Q[:, :r] @ R[:r]).T, **tol(torch.float64))
    x = torch.randn(5, n_in, generator=gen, dtype=torch.float64)
    adapted = x @ result.residual_weight + scale * (x @ result.factors.A.T) @ result.factors.B.T
    torch.testing.assert_close(adapted, x @ weight, **tol(torch.float64))  # the layer's output is unchanged


@pytest.mark.parametrize("kind, shape, fifo", LAYERS)
def test_kaiming_is_linear_default_a_and_zero_b(kind, shape, fifo):
    result = init_factors(True, kind, shape, 4, 1.0, fan_in_fan_out=fifo, generator=_seeded())
    A = result.factors.A.reshape(4, -1)
    bound = 1 / math.sqrt(A.shape[1])  # kaiming-uniform with a=sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert float(A.abs().max()) <= bound and float(A.abs().max()) > 0.5 * bound
    assert torch.count_nonzero(result.factors.B) == 0 and result.residual_weight is None and result.note is None


@pytest.mark.parametrize("kind, shape, fifo", LAYERS)
def test_gaussian_has_std_one_over_r_and_zero_b(kind, shape, fifo):
    result = init_factors("gaussian", kind, shape, 8, 1.0, fan_in_fan_out=fifo, generator=_seeded())
    A = result.factors.A
    assert 0.5 / 8 < float(A.std()) < 1.5 / 8
    assert torch.count_nonzero(result.factors.B) == 0


@pytest.mark.parametrize("kind, shape, fifo", LAYERS)
def test_random_init_is_not_a_no_op(kind, shape, fifo):
    result = init_factors(False, kind, shape, 4, 1.0, fan_in_fan_out=fifo, lora_bias=True, generator=_seeded())
    B = result.factors.B.reshape(result.factors.out_features, 4)
    assert float(B.abs().max()) <= 1 / math.sqrt(4) and torch.count_nonzero(B) == B.numel()
    assert result.factors.bias.shape == (result.factors.out_features,) and torch.count_nonzero(result.factors.bias) > 0


@pytest.mark.parametrize("kind, shape, fifo", LAYERS)
def test_orthogonal_product_is_zero(kind, shape, fifo):
    result = init_factors("orthogonal", kind, shape, 6, 1.0, fan_in_fan_out=fifo, generator=_seeded())
    A, B = result.factors.A.reshape(6, -1), result.factors.B.reshape(-1, 6)
    assert float(A.abs().max()) > 0 and float(B.abs().max()) > 0
    torch.testing.assert_close(B @ A, torch.zeros(B.shape[0], A.shape[1]), atol=1e-6, rtol=0)
    assert (result.note is None) == (kind == "linear")


@pytest.mark.parametrize("method", [True, "gaussian", "orthogonal", "pissa", "pissa_niter_2", "olora"])
def test_embedding_gets_peft_default_for_every_truthy_method(method, gen):
    """PEFT: A = 0, B ~ N(0, 1) for an embedding, whatever the method; the weight is never changed."""
    weight = torch.randn(50, 8, generator=gen)  # (num_embeddings, dim)
    result = init_factors(method, "embedding", (50, 8), 4, 1.0, weight=weight, generator=_seeded())
    assert result.factors.A.shape == (4, 50) and result.factors.B.shape == (8, 4)
    assert torch.count_nonzero(result.factors.A) == 0 and torch.count_nonzero(result.factors.B) == 32
    assert result.residual_weight is None
    base_changing = method not in (True, "gaussian")
    assert (result.note is not None) == base_changing
    if base_changing:
        assert "does not apply to embedding layers in PEFT" in result.note


def test_embedding_random_init_draws_both_normal():
    result = init_factors(False, "embedding", (50, 8), 4, 1.0, generator=_seeded())
    assert torch.count_nonzero(result.factors.A) == 200 and torch.count_nonzero(result.factors.B) == 32


def test_lora_bias_is_zero_for_kaiming():
    result = init_factors(True, "linear", (6, 4), 2, 1.0, lora_bias=True)
    assert torch.equal(result.factors.bias, torch.zeros(6))


def test_seeded_draws_are_reproducible():
    for method in (True, False, "gaussian", "orthogonal"):
        first = init_factors(method, "linear", (6, 4), 2, 1.0, generator=_seeded(5)).factors
        again = init_factors(method, "linear", (6, 4), 2, 1.0, generator=_seeded(5)).factors
        other = init_factors(method, "linear", (6, 4), 2, 1.0, generator=_seeded(6)).factors
        assert torch.equal(first.A, again.A) and torch.equal(first.B, again.B)
        assert not torch.equal(first.A, other.A)


def test_dtype_and_device_of_the_factors(gen):
    weight = torch.randn(6, 4, generator=gen).bfloat16()
    result = init_factors("pissa", "linear", (6, 4), 2, 1.0, weight=weight, dtype=torch.bfloat16)
    assert result.factors.A.dtype == torch.bfloat16 and result.residual_weight.dtype == torch.bfloat16
    assert init_factors("pissa", "linear", (6, 4), 2, 1.0, weight=weight).factors.A.dtype == torch.float32
    assert init_factors(True, "linear", (6, 4), 2, 1.0, device="cpu").factors.A.device.type == "cpu"


@pytest.mark.parametrize(
    "value, expected",
    [(True, InitMethod("kaiming")), (False, InitMethod("random")), ("gaussian", InitMethod("gaussian")),
     ("Gaussian", InitMethod("gaussian")), ("orthogonal", InitMethod("orthogonal")), ("pissa", InitMethod("pissa")),
     ("pissa_niter_16", InitMethod("pissa", 16)), ("OLoRA", InitMethod("olora"))],
)
def test_parse_init_method(value, expected):
    parsed = parse_init_method(value)
    assert parsed == expected and parsed.name in INIT_METHODS
    assert parse_init_method(parsed.config_value) == parsed
    assert parsed.modifies_base == (parsed.name in ("pissa", "olora"))


@pytest.mark.parametrize("value", ["eva", "corda", "loftq", "lora_ga", "mica", "LoftQ"])
def test_unsupported_methods_raise_clearly(value):
    with pytest.raises(UnsupportedError) as info:
        init_factors(value, "linear", (4, 4), 2, 1.0, weight=torch.zeros(4, 4))
    message = str(info.value)
    assert f"init_lora_weights={value!r} is not supported by lorasurg yet" in message
    assert "'pissa_niter_N'" in message  # says what to use instead


@pytest.mark.parametrize(
    "value, message",
    [("pissa_niter_x", "init_lora_weights='pissa_niter_x': the iteration count must be an integer >= 0"),
     ("kaiming", "unknown init_lora_weights='kaiming'; use True, False, 'gaussian'"),
     (3, "init_lora_weights must be a bool or a string, got 3"),
     ("PiSSA", "unknown init_lora_weights='PiSSA'"),  # PEFT matches 'pissa' and 'orthogonal' exactly
     ("Orthogonal", "unknown init_lora_weights='Orthogonal'")],
)
def test_invalid_methods(value, message):
    with pytest.raises(ConfigError) as info:
        parse_init_method(value)
    assert message in str(info.value)


def test_init_method_validates_itself():
    with pytest.raises(ConfigError, match="unknown initialisation 'xavier'"):
        InitMethod("xavier")
    with pytest.raises(ConfigError, match="niter=2 applies to 'pissa' only"):
        InitMethod("olora", 2)


def test_bad_requests_name_the_problem():
    with pytest.raises(ConfigError, match="'orthogonal' needs an even rank r, got r=3"):
        init_factors("orthogonal", "linear", (4, 4), 3, 1.0)
    with pytest.raises(ConfigError, match=r"'olora' needs r <= min\(out, in\) = 4 for a linear weight of shape "
                                          r"\(4, 6\), got r=5"):
        init_factors("olora", "linear", (4, 6), 5, 1.0, weight=torch.zeros(4, 6))
    with pytest.raises(ValueError, match="init_lora_weights='pissa' needs the base weight"):
        init_factors("pissa", "linear", (4, 4), 2, 1.0)
    with pytest.raises(ShapeMismatchError, match=r"base weight has shape \(4, 5\), but weight_shape is \(4, 4\)"):
        init_factors("pissa", "linear", (4, 4), 2, 1.0, weight=torch.zeros(4, 5))
    with pytest.raises(ConfigError, match="lora_bias=True needs init_lora_weights=True or False .* got 'pissa'"):
        init_factors("pissa", "linear", (4, 4), 2, 1.0, weight=torch.zeros(4, 4), lora_bias=True)
    with pytest.raises(UnsupportedError, match="lora_bias is not supported for embedding layers"):
        init_factors(True, "embedding", (10, 4), 2, 1.0, lora_bias=True)
    with pytest.raises(ValueError, match="unknown layer kind 'lstm'"):
        init_factors(True, "lstm", (4, 4), 2, 1.0)
    with pytest.raises(ValueError, match=r"a conv2d weight has 4 dimensions, got shape \(4, 4\)"):
        init_factors(True, "conv2d", (4, 4), 2, 1.0)
    with pytest.raises(ValueError, match="LoRA rank must be >= 1, got r=0"):
        init_factors(True, "linear", (4, 4), 0, 1.0)
    with pytest.raises(ValueError, match="fan_in_fan_out applies to linear layers only, not embedding"):
        init_factors(True, "embedding", (4, 4), 2, 1.0, fan_in_fan_out=True)


# --- exact PiSSA through the Gram matrix ----------------------------------------------------------------------


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_pissa_gram_is_at_least_as_accurate_as_lapack(gen, fan_in_fan_out):
    """Against a float64 reference, the Gram route (float64 for a float32 weight) is no less accurate than PEFT's
    float32 LAPACK SVD, and both give the same residual within float32 tolerance."""
    shape = (64, 96) if fan_in_fan_out else (96, 64)
    W = torch.randn(shape, generator=gen)
    kw = dict(fan_in_fan_out=fan_in_fan_out, generator=torch.Generator().manual_seed(0))
    ref = init_factors("pissa", "linear", shape, 8, 2.0, weight=W.double(), **kw).residual_weight
    lapack = init_factors("pissa", "linear", shape, 8, 2.0, weight=W, **kw).residual_weight
    gram = init_factors("pissa", "linear", shape, 8, 2.0, weight=W, exact_svd="gram", **kw).residual_weight
    assert gram.dtype == torch.float32
    assert float((gram.double() - ref).abs().max()) <= float((lapack.double() - ref).abs().max())
    torch.testing.assert_close(gram, lapack, rtol=1e-5, atol=1e-5 * float(W.abs().max()))  # LAPACK's own error


def test_exact_svd_must_be_known():
    with pytest.raises(ValueError, match="exact_svd must be one of"):
        init_factors("pissa", "linear", (4, 4), 2, 1.0, weight=torch.ones(4, 4), exact_svd="qr")


# ------------------------------------------------------------------------------------------------ draws only

_DRAW_CASES = [
    # (method, kind, weight_shape, r, fan_in_fan_out, lora_bias)
    ("pissa_niter_2", "linear", (24, 40), 4, False, False),  # wide: the test matrix is (24, 4)
    ("pissa_niter_0", "linear", (40, 24), 6, False, False),  # tall
    ("pissa_niter_3", "linear", (16, 48), 16, True, False),  # GPT-2 Conv1D layout, r = min(out, in)
    ("pissa_niter_1", "conv2d", (8, 3, 3, 3), 4, False, False),
    ("pissa", "linear", (24, 40), 4, False, False),
    ("olora", "linear", (40, 24), 4, False, False),
    ("pissa_niter_4", "embedding", (50, 12), 4, False, False),
    ("olora", "embedding", (50, 12), 4, False, False),
    (True, "linear", (24, 40), 4, False, True),
    ("gaussian", "conv1d", (8, 3, 5), 2, False, False),
    ("orthogonal", "linear", (24, 40), 4, False, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("method, kind, shape, r, fan_in_fan_out, lora_bias", _DRAW_CASES)
def test_make_init_draws_leaves_the_generator_where_init_factors_does(method, kind, shape, r, fan_in_fan_out,
                                                                      lora_bias, dtype):
    """residualize records each module's generator state with make_init_draws (no SVD, no QR): the state after it
    must equal the state after the real init, for every method, layout and weight dtype (a float64 weight draws
    its test matrix in float64). Exact: the same draws in the same order."""
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    real, dry = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    init_factors(method, kind, shape, r, 2.0, weight=weight, fan_in_fan_out=fan_in_fan_out, lora_bias=lora_bias,
                 generator=real)
    make_init_draws(method, kind, shape, r, weight_dtype=dtype, fan_in_fan_out=fan_in_fan_out, lora_bias=lora_bias,
                    generator=dry)
    assert torch.equal(dry.get_state(), real.get_state())
    assert torch.equal(torch.rand(4, generator=dry), torch.rand(4, generator=real))


def test_make_init_draws_refuses_what_init_factors_refuses():
    with pytest.raises(UnsupportedError):
        make_init_draws("eva", "linear", (8, 8), 2)
    with pytest.raises(ValueError, match="kind"):
        make_init_draws("pissa", "lstm", (8, 8), 2)
