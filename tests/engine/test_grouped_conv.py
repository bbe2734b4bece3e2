"""LoRA on grouped convolutions (lorasurg.engine.grouped_conv): the dense kernel is the composed convolution, and
PEFT's DoRA norm is not the norm of the adapted kernel (written down here: lorasurg computes PEFT's)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorasurg.engine.grouped_conv import grouped_delta_kernel, grouped_factor_shapes, grouped_init, peft_dora_norm
from tests.conftest import assert_close_ulps


def _factors(gen, out=16, inp=16, groups=8, r=8, k=3):
    A_shape, B_shape = grouped_factor_shapes((out, inp // groups, k, k), groups, r)
    return torch.randn(A_shape, generator=gen, dtype=torch.float64), torch.randn(B_shape, generator=gen,
                                                                                 dtype=torch.float64)


def test_shapes_follow_peft():
    assert grouped_factor_shapes((32, 8, 3, 3), 2, 8) == ((8, 16, 3, 3), (32, 4, 1, 1))


def test_the_dense_kernel_is_the_composed_convolution(gen):
    A, B = _factors(gen)
    x = torch.randn(2, 16, 5, 5, generator=gen, dtype=torch.float64)
    composed = F.conv2d(F.conv2d(x, A), B, groups=8) * 0.5  # B(A(x)) * scale, grouped B
    kernel = grouped_delta_kernel(A, B, 0.5, 8)  # (out, in, k, k): every input channel
    assert kernel.shape == (16, 16, 3, 3)
    assert_close_ulps(F.conv2d(x, kernel), composed, 64, magnitude=composed.abs().max())


def test_peft_dora_norm_is_not_the_adapted_kernels_norm(gen):
    A, B = _factors(gen)
    W = torch.randn(16, 2, 3, 3, generator=gen, dtype=torch.float64)
    dense = torch.zeros(16, 16, 3, 3, dtype=torch.float64)
    for o in range(16):  # the grouped weight as a dense kernel: output o reads its group's 2 input channels
        dense[o, (o // 2) * 2:(o // 2) * 2 + 2] = W[o]
    true = torch.linalg.vector_norm((dense + grouped_delta_kernel(A, B, 0.5, 8)).reshape(16, -1), dim=1)
    peft = peft_dora_norm(A, B, W, 0.5)
    assert peft.shape == (16,) and (peft - true).abs().max() > 1e-2
    at_zero = peft_dora_norm(A, torch.zeros_like(B), W, 0.5)
    assert torch.equal(at_zero, torch.linalg.vector_norm(W.reshape(16, -1), dim=1))


def test_inits_draw_like_peft_modules():
    torch.manual_seed(0)
    A, B, bias = grouped_init("kaiming", (16, 2, 3, 3), 8, 8, lora_bias=True)
    assert A.shape == (8, 16, 3, 3) and torch.count_nonzero(B) == 0 and torch.count_nonzero(bias) == 0
    torch.manual_seed(0)
    conv_a = torch.nn.Conv2d(16, 8, 3, bias=False)
    conv_b = torch.nn.Conv2d(8, 16, 1, groups=8, bias=True)
    torch.manual_seed(0)
    A2, B2, bias2 = grouped_init("random", (16, 2, 3, 3), 8, 8, lora_bias=True)
    assert torch.equal(A2, conv_a.weight.detach()) and torch.equal(B2, conv_b.weight.detach())
    assert torch.equal(bias2, conv_b.bias.detach())
