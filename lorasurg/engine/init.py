"""LoRA initialisation as pure functions: new factors (and, for PiSSA/OLoRA, a new base weight), never a write
into a live module.

Methods, by PEFT's ``init_lora_weights`` value (PEFT 0.21.2, ``peft/tuners/lora/layer.py``), on the matrix view
``M: (out, in)`` of the base weight (see :mod:`lorasurg.engine.factors`):

==================  ===========================================================================================
value               A: (r, in), B: (out, r)
==================  ===========================================================================================
``True``            A kaiming-uniform with ``a = sqrt(5)`` (nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in))),
                    B = 0
``False``           A and B both nn.Linear / nn.ConvNd defaults (kaiming-uniform, B's bound 1/sqrt(r)), so the
                    adapter is not a no-op; lora_B bias U(-1/sqrt(r), 1/sqrt(r))
``"gaussian"``      A ~ N(0, (1/r)^2), B = 0
``"orthogonal"``    r even; Q = qr(N(0,1)^{r x r}).Q; A = (N(0,1)^{in x r/2} @ Q[0::2]).T / 10,
                    B = N(0,1)^{out x r/2} @ Q[1::2] / 10; ``B @ A = 0`` since Q's rows are orthogonal
``"pissa"``         ``M = U S Vh`` exact; ``S_r' = S_r / scale``; ``A = sqrt(S_r') Vh_r``,
                    ``B = U_r sqrt(S_r')``; residual ``M - scale * B @ A`` (Meng et al. 2024,
                    https://arxiv.org/abs/2404.02948)
``"pissa_niter_N"`` as ``"pissa"`` with ``torch.svd_lowrank(M, q=r, niter=N)``
``"olora"``         ``M = Q R`` (reduced QR); ``B = Q[:, :r]``, ``A = R[:r]``; residual ``M - scale * B @ A``
                    (Büyükakyüz 2024, https://arxiv.org/abs/2406.01775)
==================  ===========================================================================================

Layer kinds, where PEFT differs by kind:

* linear (and GPT-2 ``Conv1D`` with ``fan_in_fan_out``): every method above, on the matrix view. PEFT's OLoRA
  skips the fan_in_fan_out transpose (its factors have the wrong shapes, or, for a square layer, the wrong
  product); this module applies the definition to ``W.T``.
* embedding: PEFT initialises every truthy method as ``A = 0``, ``B ~ N(0, 1)`` (reversed from linear) and only
  ``False`` differently (``A, B ~ N(0, 1)``). It applies no PiSSA/OLoRA/orthogonal init to embeddings and leaves
  their weight alone; this module does the same and says so in :attr:`InitResult.note`. ``lora_bias`` is refused.
* conv1d/2d/3d: ``True``, ``False`` and ``"gaussian"`` as PEFT. PEFT refuses PiSSA, OLoRA and orthogonal on conv
  layers (ValueError); this module applies them to the matrix view ``(out, in * prod(kernel))`` and says so in
  the note.

Unsupported methods (``eva``, ``corda``, ``loftq``, ``lora_ga``, ``mica``) raise :class:`UnsupportedError`.

Randomness: every draw comes from ``generator`` (torch's global RNG when None) in PEFT's order, including the
draws PEFT makes when it builds the ``lora_A``/``lora_B`` modules and then overwrites, so that from the same RNG
state the tensors equal PEFT's bit for bit (one layer at a time).

Floating point: PiSSA, OLoRA and orthogonal compute what PEFT computes, op for op and on the same memory layouts
(the QR or SVD of the same float32 matrix; ``(scale * B) @ A`` of contiguous factors, then one subtraction; PiSSA's
``sqrt(S) * Vh`` elementwise where PEFT multiplies by ``diag(sqrt(S))``, which has one nonzero term per entry and so
rounds identically). On any one machine their results therefore equal PEFT's bit for bit too. Across machines the
BLAS/LAPACK kernels round differently, so a matmul, QR or SVD result may differ by a few ulps from one CPU to the
next, for PEFT as for lorasurg. Draws are made on the CPU in float32 (as PEFT
builds its modules there) and then moved to ``device`` and cast to ``dtype``; ``pissa_niter_N`` draws on the
weight's device, as ``torch.svd_lowrank`` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from ..errors import ConfigError, ShapeMismatchError, UnsupportedError
from .factors import (
    LAYER_KINDS,
    LoraFactors,
    compute_dtype,
    factors_from_matrices,
    matrix_to_weight,
    weight_to_matrix,
)
from .svd import draw_test_matrix, gram_svd, split_factors, truncated_svd

__all__ = [
    "InitMethod", "InitResult", "INIT_METHODS", "EXACT_SVDS", "parse_init_method", "init_factors", "make_init_draws",
]

EXACT_SVDS = ("lapack", "gram")
_NAMES = ("kaiming", "random", "gaussian", "orthogonal", "pissa", "olora")
_UNSUPPORTED = ("eva", "corda", "loftq", "lora_ga", "mica")
_VALID = "True, False, 'gaussian', 'orthogonal', 'pissa', 'pissa_niter_N' (N >= 0) or 'olora'"


@dataclass(frozen=True)
class InitMethod:
    """A parsed ``init_lora_weights`` value.

    Attributes:
        name: a key of :data:`INIT_METHODS`: ``"kaiming"`` (True), ``"random"`` (False), ``"gaussian"``,
            ``"orthogonal"``, ``"pissa"`` or ``"olora"``.
        niter: for ``pissa_niter_N``, N; None for exact PiSSA and the other methods.
    """

    name: str
    niter: Optional[int] = None

    def __post_init__(self) -> None:
        if self.name not in _NAMES:
            raise ConfigError(f"unknown initialisation {self.name!r}; expected one of {_NAMES}")
        if self.niter is not None and (self.name != "pissa" or self.niter < 0):
            raise ConfigError(f"niter={self.niter} applies to 'pissa' only and must be >= 0 (method {self.name!r})")

    @property
    def modifies_base(self) -> bool:
        """True when the method replaces the base weight by a residual (PiSSA, OLoRA)."""
        return self.name in ("pissa", "olora")

    @property
    def config_value(self) -> Union[bool, str]:
        """The ``init_lora_weights`` value PEFT's config uses for this method."""
        if self.name in ("kaiming", "random"):
            return self.name == "kaiming"
        return f"pissa_niter_{self.niter}" if self.niter is not None else self.name


def parse_init_method(value: Union[bool, str]) -> InitMethod:
    """Read PEFT's ``init_lora_weights`` value, with PEFT's spelling rules.

    PEFT compares ``"gaussian"`` and ``"olora"`` case-insensitively and the others exactly (``"pissa"``,
    ``"pissa_niter_N"``, ``"orthogonal"``); so does this function.

    Raises:
        UnsupportedError: a PEFT method lorasurg does not implement (eva, corda, loftq, lora_ga, mica; any case).
        ConfigError: anything else that is not a valid value.
    """
    if isinstance(value, bool):
        return InitMethod("kaiming" if value else "random")
    if not isinstance(value, str):
        raise ConfigError(f"init_lora_weights must be a bool or a string, got {value!r}; use {_VALID}")
    if value.lower() in ("gaussian", "olora"):
        return InitMethod(value.lower())
    if value in ("orthogonal", "pissa"):
        return InitMethod(value)
    if value.startswith("pissa_niter_"):
        count = value[len("pissa_niter_"):]
        if not count.isdigit():
            raise ConfigError(f"init_lora_weights={value!r}: the iteration count must be an integer >= 0")
        return InitMethod("pissa", int(count))
    if value.lower() in _UNSUPPORTED or value.lower().startswith("corda"):
        raise UnsupportedError(
            f"init_lora_weights={value!r} is not supported by lorasurg yet; use one of {_VALID}, or initialise "
            "with PEFT and load the saved adapter"
        )
    raise ConfigError(f"unknown init_lora_weights={value!r}; use {_VALID}")


@dataclass(frozen=True)
class InitResult:
    """What an initialisation produces.

    Attributes:
        factors: the new LoRA factors in PEFT's stored layout (``bias`` set when ``lora_bias``).
        residual_weight: the new base weight (PiSSA/OLoRA), same shape and dtype as the given weight; else None.
        note: set when the result differs from what the method's name promises or from what PEFT does, e.g.
            PiSSA asked for an embedding (PEFT's default embedding init is used) or OLoRA on a conv layer (PEFT
            refuses it); a caller should show it to the user.
    """

    factors: LoraFactors
    residual_weight: Optional[Tensor] = None
    note: Optional[str] = None


@dataclass(frozen=True)
class _Request:
    method: InitMethod
    kind: str
    weight_shape: tuple[int, ...]
    r: int
    scale: float
    weight: Optional[Tensor]
    fan_in_fan_out: bool
    lora_bias: bool
    generator: Optional[torch.Generator]
    dtype: torch.dtype
    device: torch.device
    exact_svd: str = "lapack"

    @property
    def out_features(self) -> int:
        """Rows of the matrix view."""
        if self.kind == "linear":
            return self.weight_shape[1] if self.fan_in_fan_out else self.weight_shape[0]
        return self.weight_shape[1] if self.kind == "embedding" else self.weight_shape[0]

    @property
    def in_features(self) -> int:
        """Columns of the matrix view (``in * prod(kernel)`` for conv)."""
        if self.kind == "linear":
            return self.weight_shape[0] if self.fan_in_fan_out else self.weight_shape[1]
        return self.weight_shape[0] if self.kind == "embedding" else math.prod(self.weight_shape[1:])

    def finish(self, A: Tensor, B: Tensor, bias: Optional[Tensor], residual: Optional[Tensor] = None,
               note: Optional[str] = None) -> InitResult:
        """Matrix factors ``A: (r, in)``, ``B: (out, r)`` to an :class:`InitResult` on the requested device/dtype."""
        def out(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else t.to(self.device, self.dtype)

        factors = factors_from_matrices(out(A), out(B), self.kind, self.weight_shape, self.scale, bias=out(bias),
                                        fan_in_fan_out=self.fan_in_fan_out)
        return InitResult(factors, residual, note)


def _kaiming(shape: tuple[int, ...], generator: Optional[torch.Generator]) -> Tensor:
    """nn.Linear / nn.ConvNd's default weight init: kaiming-uniform with ``a = sqrt(5)``, on the CPU."""
    return torch.nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5), generator=generator)


def _peft_modules(req: _Request) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """The draws PEFT makes when it builds lora_A and lora_B: their default weights (and lora_B's bias).

    Returned as matrices ``(r, in)``, ``(out, r)``; drawn in the stored layout so the order of values matches.
    """
    r, out = req.r, req.out_features
    if req.kind == "embedding":
        A = torch.randn(r, req.in_features, generator=req.generator)  # (r, num_embeddings)
        B = torch.randn(out, r, generator=req.generator)  # (embedding_dim, r)
        return A, B, None
    conv_ones = (1,) * (len(req.weight_shape) - 2) if req.kind != "linear" else ()
    A = _kaiming((r, *req.weight_shape[1:]) if conv_ones else (r, req.in_features), req.generator)
    B = _kaiming((out, r, *conv_ones), req.generator)
    bias = None
    if req.lora_bias:
        bound = 1 / math.sqrt(r)  # nn.Linear / nn.ConvNd default bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        bias = torch.empty(out).uniform_(-bound, bound, generator=req.generator)
    return A.reshape(r, -1), B.reshape(out, r), bias  # (r, in*prod(k)), (out, r)


def _embedding_b(req: _Request) -> Tensor:
    """The draws of an embedding LoRA's default init: PEFT's module weights, then ``B ~ N(0, 1)``: ``(dim, r)``."""
    _, B, _ = _peft_modules(req)
    return torch.nn.init.normal_(torch.empty_like(B), generator=req.generator)  # (dim, r)


def _embedding_default(req: _Request, note: Optional[str] = None) -> InitResult:
    """PEFT's init of an embedding LoRA for every truthy method: A = 0, B ~ N(0, 1)."""
    return req.finish(torch.zeros(req.r, req.in_features), _embedding_b(req), None, note=note)


def _zero_b(req: _Request, A: Tensor) -> InitResult:
    bias = torch.zeros(req.out_features) if req.lora_bias else None
    return req.finish(A, torch.zeros(req.out_features, req.r), bias)


def _init_kaiming(req: _Request) -> InitResult:
    if req.kind == "embedding":
        return _embedding_default(req)
    A, _, _ = _peft_modules(req)
    return _zero_b(req, _kaiming(tuple(A.shape), req.generator))


def _init_random(req: _Request) -> InitResult:
    A, B, bias = _peft_modules(req)
    return req.finish(A, B, bias)


def _init_gaussian(req: _Request) -> InitResult:
    if req.kind == "embedding":
        return _embedding_default(req)
    A, _, _ = _peft_modules(req)
    return _zero_b(req, torch.nn.init.normal_(torch.empty_like(A), std=1 / req.r, generator=req.generator))


def _embedding_note(req: _Request) -> str:
    return (f"init_lora_weights={req.method.config_value!r} does not apply to embedding layers in PEFT; "
            "initialised as PEFT does (lora_embedding_A = 0, lora_embedding_B ~ N(0, 1)), base weight unchanged")


def _conv_note(req: _Request) -> Optional[str]:
    if req.kind not in ("conv1d", "conv2d", "conv3d"):
        return None
    return (f"PEFT 0.21.2 refuses init_lora_weights={req.method.config_value!r} on {req.kind} layers; lorasurg "
            f"applied it to the flattened kernel (out, in*prod(kernel)) = ({req.out_features}, {req.in_features})")


def _init_orthogonal(req: _Request) -> InitResult:
    if req.kind == "embedding":
        return _embedding_default(req, _embedding_note(req))
    if req.r % 2:
        raise ConfigError(f"init_lora_weights='orthogonal' needs an even rank r, got r={req.r}")
    _peft_modules(req)
    half = req.r // 2
    Q = torch.linalg.qr(torch.randn(req.r, req.r, generator=req.generator)).Q  # (r, r)
    A = (torch.randn(req.in_features, half, generator=req.generator) @ Q[0::2]).T / 10.0  # ((in, r/2) @ (r/2, r)).T
    B = torch.randn(half, req.out_features, generator=req.generator).T @ Q[1::2] / 10.0  # (out, r/2) @ (r/2, r)
    return req.finish(A, B, None, note=_conv_note(req))


def _base_matrix(req: _Request) -> tuple[Tensor, torch.dtype]:
    """The base weight's matrix view in the compute dtype, checked against the request."""
    weight = req.weight
    if weight is None:
        raise ValueError(f"init_lora_weights={req.method.config_value!r} needs the base weight (weight=...)")
    limit = min(req.out_features, req.in_features)
    if req.r > limit:
        raise ConfigError(
            f"init_lora_weights={req.method.config_value!r} needs r <= min(out, in) = {limit} for a {req.kind} "
            f"weight of shape {tuple(req.weight_shape)}, got r={req.r}"
        )
    matrix = weight_to_matrix(weight, req.kind, req.fan_in_fan_out)  # (out, in)
    return matrix.to(compute_dtype(weight)), weight.dtype


def _residual(req: _Request, M: Tensor, A: Tensor, B: Tensor, dtype: torch.dtype) -> Tensor:
    """``M - scale * B @ A`` as PEFT computes it: ``(scale * B) @ A`` (Python's left-to-right ``*``/``@``), with A
    and B contiguous (PEFT stores them in ``nn.Linear`` weights before it forms the product), then one subtraction.

    Same ops on the same memory layouts dispatch to the same BLAS kernel, so on any one machine the residual equals
    PEFT's bit for bit; a strided view of Q or R (a different GEMM transpose mode) rounds differently on some CPUs.
    """
    residual = M - (req.scale * B) @ A  # (out, in) - (out, r) @ (r, in); PEFT's order of operations
    return matrix_to_weight(residual, req.kind, req.weight_shape, req.fan_in_fan_out).to(dtype)


def _init_pissa(req: _Request) -> InitResult:
    if req.kind == "embedding":
        return _embedding_default(req, _embedding_note(req))
    _peft_modules(req)
    M, dtype = _base_matrix(req)
    if req.method.niter is None and req.exact_svd == "gram":
        precise = dtype in (torch.float32, torch.float64)  # the residual is stored in dtype: hold its precision
        U, S, Vh = gram_svd(M, req.r, dtype=torch.float64 if precise else None)
        A, B = split_factors(U, S, Vh, req.scale)  # (r, in), (out, r)
        return req.finish(A, B, None, _residual(req, M, A, B, dtype), _conv_note(req))
    if req.method.niter is None:
        method, kwargs = "exact", {}
    else:  # torch.svd_lowrank(M, q=r, niter=N) on the global RNG of M's device, or on the given generator
        method, kwargs = "randomized", dict(oversample=0, power_iters=req.method.niter, generator=req.generator,
                                            seed=None)
    U, S, Vh = truncated_svd(M, req.r, method=method, **kwargs)
    A, B = split_factors(U, S, Vh, req.scale)  # (r, in), (out, r)
    return req.finish(A, B, None, _residual(req, M, A, B, dtype), _conv_note(req))


def _init_olora(req: _Request) -> InitResult:
    if req.kind == "embedding":
        return _embedding_default(req, _embedding_note(req))
    _peft_modules(req)
    M, dtype = _base_matrix(req)
    Q, R = torch.linalg.qr(M)  # (out, p), (p, in) with p = min(out, in)
    B, A = Q[:, :req.r].contiguous(), R[:req.r].contiguous()  # (out, r), (r, in); row-major like PEFT's copies
    return req.finish(A, B, None, _residual(req, M, A, B, dtype), _conv_note(req))


INIT_METHODS: dict[str, Callable[[_Request], InitResult]] = {
    "kaiming": _init_kaiming,
    "random": _init_random,
    "gaussian": _init_gaussian,
    "orthogonal": _init_orthogonal,
    "pissa": _init_pissa,
    "olora": _init_olora,
}
"""Every initialisation by :attr:`InitMethod.name`."""


def init_factors(
    method: Union[bool, str, InitMethod],
    kind: str,
    weight_shape: tuple[int, ...],
    r: int,
    scale: float,
    *,
    weight: Optional[Tensor] = None,
    fan_in_fan_out: bool = False,
    lora_bias: bool = False,
    generator: Optional[torch.Generator] = None,
    dtype: Optional[torch.dtype] = None,
    device: Optional[Union[str, torch.device]] = None,
    exact_svd: str = "lapack",
) -> InitResult:
    """Initialise the LoRA of one layer as PEFT's ``init_lora_weights=method`` does (see the module docstring).

    Args:
        method: PEFT's ``init_lora_weights`` value, or a parsed :class:`InitMethod`.
        kind: ``"linear"``, ``"embedding"``, ``"conv1d"``, ``"conv2d"`` or ``"conv3d"``.
        weight_shape: the base weight's shape in its own layout (``(in, out)`` for fan_in_fan_out).
        r: the rank, >= 1.
        scale: the LoRA scale (``alpha / r`` or ``alpha / sqrt(r)``); PiSSA divides S by it, the residuals use it.
        weight: the base weight; required by PiSSA and OLoRA, ignored by the others.
        fan_in_fan_out: the base weight is stored ``(in, out)`` (GPT-2 ``Conv1D``); linear only.
        lora_bias: also create ``lora_B``'s bias (PEFT allows it with True/False only, and not for embeddings).
        generator: a CPU generator for every draw; None uses torch's global RNG, in PEFT's order.
        dtype: dtype of A, B and the bias; default the compute dtype (float32, float64 for a float64 weight).
        device: device of A, B and the bias; default the weight's device, else the CPU.
        exact_svd: the SVD of exact PiSSA: ``"lapack"`` (``torch.linalg.svd``, PEFT's, bit for bit) or ``"gram"``
            (:func:`lorasurg.engine.svd.gram_svd`: the same triplets from the smaller Gram matrix, several times
            faster on the CPU; float64 when the weight is float32/float64, so the residual keeps its precision).

    Returns:
        :class:`InitResult`: factors, the residual base weight for PiSSA/OLoRA (same shape and dtype as
        ``weight``; ``residual + delta_weight(factors) == weight`` up to rounding), and a note.

    Raises:
        UnsupportedError: eva, corda, loftq, lora_ga, mica; lora_bias on an embedding.
        ConfigError: an invalid method; lora_bias with a method other than True/False; an odd rank for
            orthogonal; r larger than min(out, in) for PiSSA/OLoRA.
        ShapeMismatchError: ``weight.shape != weight_shape``.
        ValueError: unknown kind, r < 1, a bad weight_shape, fan_in_fan_out on a non-linear kind, no weight for
            PiSSA/OLoRA.
    """
    parsed = method if isinstance(method, InitMethod) else parse_init_method(method)
    shape = tuple(int(d) for d in weight_shape)
    _check_request(parsed, kind, shape, r, fan_in_fan_out, lora_bias, weight)
    if device is None:
        device = weight.device if weight is not None else torch.device("cpu")
    if dtype is None:
        dtype = compute_dtype(weight)
    if exact_svd not in EXACT_SVDS:
        raise ValueError(f"exact_svd must be one of {EXACT_SVDS}, got {exact_svd!r}")
    req = _Request(parsed, kind, shape, r, float(scale), weight, fan_in_fan_out, lora_bias, generator, dtype,
                   torch.device(device), exact_svd)
    return INIT_METHODS[parsed.name](req)


def make_init_draws(
    method: Union[bool, str, InitMethod],
    kind: str,
    weight_shape: tuple[int, ...],
    r: int,
    *,
    weight_dtype: torch.dtype = torch.float32,
    fan_in_fan_out: bool = False,
    lora_bias: bool = False,
    generator: Optional[torch.Generator] = None,
) -> None:
    """Make exactly the random draws :func:`init_factors` makes for a CPU weight of ``weight_shape`` and
    ``weight_dtype``, and none of its arithmetic: ``generator`` (torch's global CPU RNG when None) ends where
    :func:`init_factors` would leave it.

    For a caller that initialises modules in another order than PEFT draws for them (``residualize`` streams BASE in
    file order, PEFT draws in module order): it records each module's generator state cheaply. The draws of PiSSA
    and OLoRA are PEFT's module weights (kaiming-uniform ``A``, ``B``), then, for ``pissa_niter_N``, the Gaussian
    test matrix ``(min(out, in), min(r, out, in))`` in the compute dtype (float64 for a float64 weight), or for an
    embedding ``B ~ N(0, 1)``; the other methods need no weight and run as they are.

    Raises:
        what :func:`init_factors` raises for these arguments (a weight is never needed).
    """
    parsed = method if isinstance(method, InitMethod) else parse_init_method(method)
    shape = tuple(int(d) for d in weight_shape)
    _check_request(parsed, kind, shape, r, fan_in_fan_out, lora_bias, None)
    req = _Request(parsed, kind, shape, r, 1.0, None, fan_in_fan_out, lora_bias, generator, torch.float32,
                   torch.device("cpu"))
    if parsed.name not in ("pissa", "olora"):
        INIT_METHODS[parsed.name](req)  # factors of shape (r, in) and (out, r): the draws are the work
    elif kind == "embedding":
        _embedding_b(req)
    else:
        _peft_modules(req)
        if parsed.niter is not None:  # truncated_svd's test matrix, with torch.svd_lowrank's q = r and no oversampling
            m, n = req.out_features, req.in_features
            work = torch.float64 if weight_dtype == torch.float64 else torch.float32
            draw_test_matrix(min(m, n), min(r, m, n), work, torch.device("cpu"), generator, None)


def _check_request(method: InitMethod, kind: str, shape: tuple[int, ...], r: int, fan_in_fan_out: bool,
                   lora_bias: bool, weight: Optional[Tensor]) -> None:
    if kind not in LAYER_KINDS:
        raise ValueError(f"unknown layer kind {kind!r}; expected one of {LAYER_KINDS}")
    expected_dims = {"linear": 2, "embedding": 2, "conv1d": 3, "conv2d": 4, "conv3d": 5}[kind]
    if len(shape) != expected_dims:
        raise ValueError(f"a {kind} weight has {expected_dims} dimensions, got shape {shape}")
    if r < 1:
        raise ValueError(f"LoRA rank must be >= 1, got r={r}")
    if fan_in_fan_out and kind != "linear":
        raise ValueError(f"fan_in_fan_out applies to linear layers only, not {kind}")
    if weight is not None and tuple(weight.shape) != shape:
        raise ShapeMismatchError(f"the base weight has shape {tuple(weight.shape)}, but weight_shape is {shape}")
    if lora_bias and kind == "embedding":
        raise UnsupportedError("lora_bias is not supported for embedding layers (PEFT refuses it too); "
                               "leave the embedding out of target_modules or set lora_bias=False")
    if lora_bias and method.name not in ("kaiming", "random"):
        raise ConfigError(f"lora_bias=True needs init_lora_weights=True or False (as in PEFT), got "
                          f"{method.config_value!r}")
