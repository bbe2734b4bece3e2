"""Initialisation through lorasurg.engine.init: no-op starts, PiSSA/OLoRA residuals, checks before any change."""

from __future__ import annotations

import pytest
import torch

from lorasurg.errors import UnsupportedError
from lorasurg.runtime import inject
from lorasurg.runtime.base import LoraLayer
from tests.conftest import tol
from tests.runtime.models import gpt2, make_config, net, net_input, output, token_input


@pytest.mark.parametrize("method", ["pissa", "pissa_niter_4", "olora"])
@pytest.mark.parametrize("use_dora", [False, True])
def test_residual_inits_keep_the_function_and_replace_the_base(method, use_dora):
    original = net()
    model = inject(net(), make_config(r=2, lora_alpha=3, target_modules=["lin", "nobias", "conv1"],
                                      init_lora_weights=method, use_dora=use_dora))
    x = net_input()
    torch.testing.assert_close(output(model, x), output(original, x), **tol(torch.float32))
    layer = model.nobias
    assert not torch.allclose(layer.base_layer.weight, original.nobias.weight)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    restored = layer.base_layer.weight + layer.scaling["default"] * B @ A  # (out, r) @ (r, in)
    torch.testing.assert_close(restored, original.nobias.weight, **tol(torch.float32))
    if use_dora:
        norms = original.nobias.weight.norm(dim=1)  # (out,)
        torch.testing.assert_close(layer.lora_magnitude_vector["default"].weight, norms, **tol(torch.float32))


def test_olora_on_gpt2_conv1d_follows_the_definition():
    original = gpt2()
    model = inject(gpt2(), make_config(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights="olora"))
    layer = model.transformer.h[0].attn.c_attn
    W = original.transformer.h[0].attn.c_attn.weight.T  # Conv1D stores (in, out): matrix view (out, in)
    Q, R = torch.linalg.qr(W)  # (out, in), (in, in)
    torch.testing.assert_close(layer.lora_B["default"].weight, Q[:, :4])
    torch.testing.assert_close(layer.lora_A["default"].weight, R[:4])
    residual = (W - 2.0 * Q[:, :4] @ R[:4]).T  # back to (in, out)
    torch.testing.assert_close(layer.base_layer.weight, residual, **tol(torch.float32))
    x = token_input()
    torch.testing.assert_close(output(model, x), output(original, x), **tol(torch.float32))


def test_orthogonal_init_starts_as_a_no_op():
    model = inject(net(), make_config(r=4, target_modules=["lin", "nobias"], init_lora_weights="orthogonal"))
    x = net_input()
    torch.testing.assert_close(output(model, x), output(net(), x), **tol(torch.float32))
    assert model.lin.lora_B["default"].weight.abs().sum() > 0


def test_pissa_on_an_embedding_warns_and_uses_the_default_init():
    original = net()
    with pytest.warns(UserWarning, match="emb: .*does not apply to embedding"):
        model = inject(net(), make_config(r=2, target_modules=["emb"], init_lora_weights="pissa"))
    assert torch.equal(model.emb.base_layer.weight, original.emb.weight)
    assert torch.all(model.emb.lora_embedding_A["default"] == 0)


@pytest.mark.parametrize("kwargs,message", [
    (dict(r=3, init_lora_weights="orthogonal"), "lin: init_lora_weights='orthogonal' needs an even rank"),
    (dict(r=4, init_lora_weights="pissa"), r"lin: init_lora_weights='pissa' needs r <= min\(out, in\) = 3"),
])
def test_an_init_that_cannot_apply_is_refused_before_any_base_weight_changes(kwargs, message):
    model = net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedError, match=message):
        inject(model, make_config(target_modules=["nobias", "lin"], **kwargs))
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
