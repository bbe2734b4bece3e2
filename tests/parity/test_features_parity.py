"""PEFT 0.21.2's own LoRA TEST_CASES for trainable tokens, grouped convolutions and ``nn.MultiheadAttention``
(``tests/test_custom_models.py``, on its custom models, :mod:`tests.parity.peft_models`), its layer-replication test
(``test_decoder_models.py::test_lora_layer_replication``, on a tiny Llama) and trainable tokens on tied and untied
Llama heads, run against lorasurg's runtime and checked as ``test_runtime_parity`` checks: state_dict keys, initial
tensors from the same seed, forward in eval and in train mode (dropout 0) with gradients, disabled, merged, trainable
counts, and saved files cross-loaded both ways with no missing or unexpected keys.

Where PEFT 0.21.2 is wrong, each case says so and the test shows it: its ``nn.MultiheadAttention`` adds the out_proj
delta twice (parity is checked with that LoRA at zero, and the doubling separately), it merges every copy of a
replicated layer into the weight they share, and it merges trainable tokens of a head tied to an embedding with other
rows into the shared weight.
"""

from __future__ import annotations

import warnings

import pytest
import torch

peft = pytest.importorskip("peft")

from lorasurg.errors import UnsupportedError  # noqa: E402
from lorasurg.runtime import (  # noqa: E402
    disable_adapters,
    inject,
    load_adapter,
    merge_adapter,
    merge_and_unload,
    save_adapter,
    set_adapter,
    trainable_parameters,
    unmerge_adapter,
)
from tests.conftest import tol  # noqa: E402
from tests.parity.peft_models import Conv2dGroups, Conv2dGroups2, EmbConv1D, Mha, build, peft_input  # noqa: E402
from tests.runtime.models import llama, make_config, output, perturb, token_input  # noqa: E402

PREFIX = "base_model.model."
REPLICATION = dict(target_modules=["down_proj", "up_proj"], task_type="CAUSAL_LM", lora_dropout=0.0,
                   layer_replication=[[0, 1], [0, 2], [1, 2]])
MODELS = {
    "EmbConv1D": (lambda: build(EmbConv1D), peft_input),
    "Conv2dGroups": (lambda: build(Conv2dGroups), peft_input),
    "Conv2dGroups2": (lambda: build(Conv2dGroups2), peft_input),
    "MHA": (lambda: build(Mha), peft_input),
    "llama": (llama, token_input),
    "llama_tied": (lambda: llama(tie=True), token_input),
}
# name: (model, config, PEFT can merge it)
CASES = {
    "Embedding + transformers Conv1D 1 LoRA trainable_tokens": (
        "EmbConv1D", dict(target_modules=["conv1d"], trainable_token_indices={"emb": [0, 10]}), True),
    "Conv2d Groups LoRA": ("Conv2dGroups", dict(target_modules=["conv2d"]), False),
    "Conv2d Groups2 LoRA": ("Conv2dGroups2", dict(target_modules=["conv2d"]), False),
    "Conv2d Groups LoRA with DoRA": ("Conv2dGroups", dict(target_modules=["conv2d"], use_dora=True), False),
    "Conv2d Groups2 LoRA with DoRA": ("Conv2dGroups2", dict(target_modules=["conv2d"], use_dora=True), False),
    "MHA 1 LoRA": ("MHA", dict(target_modules=["mha"]), True),
    "MHA 2 LoRA": ("MHA", dict(target_modules=["mha", "lin0"]), True),
    "Llama layer_replication": ("llama", REPLICATION, False),
    "Llama tied trainable tokens": ("llama_tied", dict(target_modules=["q_proj"], trainable_token_indices=[1, 3, 5]),
                                    True),
    "Llama untied trainable tokens, embedding and head": (
        "llama", dict(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [1, 3], "lm_head": [3, 7]}),
        True),
}


def _base(case: str):
    return MODELS[CASES[case][0]][0]()


def _input(case: str):
    return MODELS[CASES[case][0]][1]()


def _peft(case: str, **overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(_base(case), peft.LoraConfig(**{**CASES[case][1], **overrides})).eval()


def _ours(case: str, **overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return inject(_base(case), make_config(**{**CASES[case][1], **overrides})).eval()


@torch.no_grad()
def _zero_attention_out_proj(model) -> None:
    """PEFT adds the out_proj LoRA of an attention twice: parity is checked with it at zero."""
    for name, module in model.named_modules():
        if name.endswith("mha.base_layer.out_proj"):
            for b in module.lora_B.values():
                b.weight.zero_()


def _trained_pair(case: str):
    """PEFT's model with perturbed adapter tensors, and lorasurg's with the same state."""
    theirs = _peft(case, init_lora_weights=False)
    perturb(theirs)
    _zero_attention_out_proj(theirs)
    ours = _ours(case, init_lora_weights=False)
    ours.load_state_dict(theirs.base_model.model.state_dict())
    return theirs, ours


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("init", [True, False, "gaussian"])
def test_keys_and_initial_tensors_are_peft_s(case, init):
    torch.manual_seed(3)
    theirs = _peft(case, init_lora_weights=init).base_model.model.state_dict()
    torch.manual_seed(3)
    ours = _ours(case, init_lora_weights=init).state_dict()
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


@pytest.mark.parametrize("case", sorted(CASES))
def test_trainable_parameters_are_peft_s(case):
    ours, theirs = _ours(case), _peft(case)
    count = trainable_parameters(ours)
    assert (count.trainable, count.total) == theirs.get_nb_trainable_parameters()
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n.removeprefix(PREFIX) for n, p in theirs.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_in_eval_and_train_and_gradients_are_peft_s(case):
    theirs, ours = _trained_pair(case)
    x = _input(case)
    with torch.no_grad():
        assert _rel(output(ours, x), output(theirs, x)) < 1e-5
    ours.train(), theirs.train()  # dropout is 0 in every case: train mode must give the same numbers
    output(ours, x).pow(2).mean().backward()
    output(theirs, x).pow(2).mean().backward()
    grads = {n.removeprefix(PREFIX): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for name, param in ours.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name], **tol(torch.float32), msg=name)


@pytest.mark.parametrize("case", sorted(CASES))
def test_disabled_is_the_base_model(case):
    """(With layer_replication, the base of the replicated stack: PEFT keeps the copies when disabled.)"""
    theirs, ours = _trained_pair(case)
    x = _input(case)
    with torch.no_grad():
        base = output(_base(case), x)
        with disable_adapters(ours), theirs.disable_adapter():
            assert _rel(output(ours, x), output(theirs, x)) < 1e-6
            if "layer_replication" not in CASES[case][1]:
                assert _rel(output(ours, x), base) < 1e-6


@pytest.mark.parametrize("case", sorted(c for c, (_, _, merges) in CASES.items() if merges))
def test_merged_is_peft_s_merge(case):
    theirs, ours = _trained_pair(case)
    x = _input(case)
    with torch.no_grad():
        expected = output(ours, x)
        merge_adapter(ours)
        assert _rel(output(ours, x), expected) < 1e-5
        unmerge_adapter(ours)
        assert _rel(output(ours, x), expected) < 1e-5
        assert _rel(output(merge_and_unload(ours), x), output(theirs.merge_and_unload(), x)) < 1e-5


@pytest.mark.parametrize("case", sorted(c for c in CASES if "Groups" in c))
def test_grouped_convolutions_are_not_merged_as_in_peft(case):
    theirs, ours = _trained_pair(case)
    with pytest.raises(NotImplementedError, match="groups > 1"):
        theirs.merge_and_unload()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(UnsupportedError, match="grouped convolution"):
        merge_and_unload(ours)
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())


def _adapter_keys(keys) -> list[str]:
    return sorted(k for k in keys if ".lora_" in k or "modules_to_save" in k or "trainable_tokens_delta" in k)


@pytest.mark.parametrize("case", sorted(CASES))
def test_saved_files_cross_load_both_ways(tmp_path, case):
    theirs, ours = _trained_pair(case)
    x = _input(case)
    save_adapter(ours, str(tmp_path / "ours"))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    ours_keys = peft.utils.load_peft_weights(str(tmp_path / "ours"))
    assert sorted(ours_keys) == sorted(peft.utils.load_peft_weights(str(tmp_path / "theirs")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = peft.LoraConfig.from_pretrained(str(tmp_path / "ours"))
        peft_loaded = peft.get_peft_model(_base(case), config).eval()
        result = peft.set_peft_model_state_dict(peft_loaded, ours_keys)
    tied = [k for k in result.missing_keys if k.startswith(f"{PREFIX}lm_head.token_adapter.")
            and getattr(peft_loaded.base_model.model.lm_head.token_adapter, "tied_adapter", None) is not None]
    assert _adapter_keys(set(result.missing_keys) - set(tied)) == [] and result.unexpected_keys == []
    ours_loaded = load_adapter(_base(case), str(tmp_path / "theirs"))
    with torch.no_grad():
        expected = output(theirs, x)
        assert _rel(output(peft_loaded, x), expected) < 1e-5
        assert _rel(output(ours_loaded, x), expected) < 1e-5


# -------------------------------------------------------------------------------- layer replication, in detail
def test_layer_replication_builds_peft_s_stack():
    """PEFT's own assertions (test_lora_layer_replication), on lorasurg's model."""
    model = _ours("Llama layer_replication")
    layers = model.model.layers
    assert len(layers) == 4 and model.config.num_hidden_layers == 4
    ptr = [layer.mlp.up_proj.base_layer.weight.data_ptr() for layer in layers]
    assert ptr[0] == ptr[1] and ptr[2] == ptr[3] and ptr[0] != ptr[2]
    lora = [layer.mlp.up_proj.lora_A["default"].weight.data_ptr() for layer in layers]
    assert len(set(lora)) == 4
    assert len([n for n, _ in model.named_parameters() if ".lora_A." in n]) == 8
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2, 3]


def test_replicated_layers_merge_and_unload_restores_the_stack():
    """PEFT means to refuse merging replicated layers (``_check_merge_allowed``), but its check reads the adapter
    dict, not the config, so it merges each copy's delta into the weight the copies share: the merged model is not the
    adapted one. lorasurg gives each copy its weight before merging."""
    theirs, ours = _trained_pair("Llama layer_replication")
    x = token_input()
    with torch.no_grad():
        adapted = output(theirs, x)
        assert _rel(output(theirs.merge_and_unload(), x), adapted) > 1e-3
        expected = output(ours, x)
        assert _rel(expected, adapted) < 1e-5
        merge_adapter(ours)
        assert _rel(output(ours, x), expected) < 1e-5
        unmerge_adapter(ours)
        assert _rel(output(ours, x), expected) < 1e-5
        merged = merge_and_unload(ours)
        assert len(merged.model.layers) == 4 and _rel(output(merged, x), expected) < 1e-5
        restored = llama()
        model = inject(restored, make_config(**REPLICATION))
        from lorasurg.runtime import unload

        unload(model)
        assert len(model.model.layers) == 2 and model.config.num_hidden_layers == 2
        assert torch.equal(output(model, x), output(llama(), x))


# ----------------------------------------------------------------------------------- trainable tokens, in detail
def test_a_head_tied_to_an_embedding_with_other_rows_merges_without_mixing_them():
    """``{"embed_tokens": A, "lm_head": B}`` on a tied Llama: PEFT wraps both over the one shared weight, and its merge
    writes both row sets into it, so the merged model is not the adapted one; lorasurg's merge keeps them apart."""
    config = dict(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [1, 3, 5], "lm_head": [2, 3]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(llama(tie=True), peft.LoraConfig(**config)).eval()
    perturb(theirs)
    ours = inject(llama(tie=True), make_config(**config)).eval()
    ours.load_state_dict(theirs.base_model.model.state_dict())
    x = token_input()
    with torch.no_grad():
        adapted = output(theirs, x)
        assert _rel(output(ours, x), adapted) < 1e-6
        assert _rel(output(theirs.merge_and_unload(), x), adapted) > 1e-3
        assert _rel(output(merge_and_unload(ours), x), adapted) < 1e-5


@pytest.mark.parametrize("second", [dict(target_modules=["lin0"], trainable_token_indices={"emb": [3, 4, 5, 6]}),
                                    dict(target_modules=["conv1d"], trainable_token_indices={"emb": [3, 4, 5, 6]})])
def test_two_adapters_with_trainable_tokens_switch_like_peft(tmp_path, second):
    """PEFT's "LoRA + trainable tokens Same / Different" pair, one adapter active at a time."""
    first = dict(target_modules=["lin0"], init_lora_weights=False, trainable_token_indices={"emb": [0, 1, 2]})
    second = dict(second, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(build(EmbConv1D), peft.LoraConfig(**first)).eval()
        theirs.add_adapter("other", peft.LoraConfig(**second))
    perturb(theirs)
    theirs.save_pretrained(str(tmp_path))
    ours = load_adapter(build(EmbConv1D), str(tmp_path))
    load_adapter(ours, str(tmp_path / "other"), "other")
    x = peft_input()
    with torch.no_grad():
        assert _rel(output(ours, x), output(theirs, x)) < 1e-5
        theirs.set_adapter("other")
        set_adapter(ours, "other")
        assert _rel(output(ours, x), output(theirs, x)) < 1e-5


def test_peft_s_refusals_of_trainable_tokens():
    from lorasurg.errors import ConfigError

    with pytest.raises(ConfigError, match="emb is also a LoRA target"):
        inject(build(EmbConv1D), make_config(target_modules=["conv1d", "emb"], trainable_token_indices={"emb": [0]}))
    with pytest.raises(ConfigError, match="also in modules_to_save"):
        inject(build(EmbConv1D), make_config(target_modules=["conv1d"], modules_to_save=["emb"],
                                            trainable_token_indices={"emb": [0]}))
    with pytest.raises(ConfigError, match=r"'nope' matches no module"):
        inject(build(EmbConv1D), make_config(target_modules=["conv1d"], trainable_token_indices={"nope": [0]}))
    with pytest.raises(ConfigError, match=r"100 rows.*\[100, 102\].*resize the token embeddings"):
        inject(build(EmbConv1D), make_config(target_modules=["conv1d"], trainable_token_indices={"emb": [1, 100, 102]}))


# ------------------------------------------------------------------------------- where PEFT 0.21.2 is wrong: MHA
def test_peft_adds_the_attention_out_proj_delta_twice():
    theirs = _peft("MHA 1 LoRA", init_lora_weights=False)
    perturb(theirs)
    ours = _ours("MHA 1 LoRA", init_lora_weights=False)
    ours.load_state_dict(theirs.base_model.model.state_dict())
    x = peft_input()
    mha = ours.mha
    with torch.no_grad():
        single = output(ours, x)
        plain = build(Mha)
        scale = mha.scaling["default"]
        plain.mha.in_proj_weight += scale * mha.lora_B["default"].weight @ mha.lora_A["default"].weight
        out = mha.base_layer.out_proj
        plain.mha.out_proj.weight += scale * out.lora_B["default"].weight @ out.lora_A["default"].weight
        assert _rel(output(plain, x), single) < 1e-5  # lorasurg: W + s B A on each weight
        assert _rel(output(theirs, x), single) > 1e-3
        out.lora_B["default"].weight.mul_(2)
        assert _rel(output(theirs, x), output(ours, x)) < 1e-5  # PEFT: W_out + 2 s B_o A_o


# ------------------------------------------------------------------------------------------ the other differences
def test_a_second_adapter_with_bias_is_refused_as_in_peft():
    from lorasurg.errors import ConfigError

    model = inject(build(EmbConv1D), make_config(target_modules=["lin0"], bias="all"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(build(EmbConv1D), peft.LoraConfig(target_modules=["lin0"], bias="all"))
        with pytest.raises(ValueError, match="supports only 1 adapter with bias"):
            theirs.add_adapter("other", peft.LoraConfig(target_modules=["lin0"], bias="lora_only"))
    with pytest.raises(ConfigError, match="only one adapter per model may train base biases"):
        inject(model, make_config(target_modules=["lin0"], bias="lora_only"), "other")
    inject(model, make_config(target_modules=["lin0"]), "plain")  # bias="none" is fine


def test_lora_bias_on_a_bias_less_layer_warns_as_in_peft():
    from torch import nn

    model = torch.nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="lora_bias=True on 1 layer.*without a bias: 0"):
        inject(model, make_config(target_modules=["0", "1"], lora_bias=True))
    with pytest.warns(UserWarning, match="has no bias"):
        peft.get_peft_model(torch.nn.Sequential(nn.Linear(4, 4, bias=False)),
                            peft.LoraConfig(target_modules=["0"], lora_bias=True))
