"""Unit tests of lorasurg.targeting: each PEFT rule and each error message, on hand-written module lists."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from lorasurg.errors import ConfigError, UnsupportedError
from lorasurg.modules import ModuleInfo
from lorasurg.targeting import (
    ALL_LINEAR,
    anchored_pattern_key,
    exact_target_modules,
    is_module_to_save,
    layer_index,
    modules_to_save,
    nearest_names,
    pattern_key,
    rank_alpha,
    select_modules,
    select_modules_to_save,
    unused_pattern_keys,
)

LIN = ModuleInfo("Linear", "linear", False, (4, 4), True)
CONV1D = ModuleInfo("Conv1D", "linear", True, (4, 12), True)
EMB = ModuleInfo("Embedding", "embedding", False, (10, 4))
BOX = ModuleInfo("Block")


def cfg(**kw):
    """A stand-in for LoraConfig with PEFT's defaults for the fields targeting reads."""
    base = dict(
        r=8, lora_alpha=8, target_modules=None, exclude_modules=None, layers_to_transform=None,
        layers_pattern=None, modules_to_save=None, rank_pattern={}, alpha_pattern={}, task_type=None,
        target_parameters=None, layer_replication=None, ensure_weight_tying=False,
    )
    base.update(kw)
    return SimpleNamespace(**base)


def llama(n_layers=2):
    mods = {"model": BOX, "model.embed_tokens": EMB, "model.layers": BOX}
    for i in range(n_layers):
        mods[f"model.layers.{i}"] = BOX
        mods[f"model.layers.{i}.self_attn"] = ModuleInfo("LlamaAttention")
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            mods[f"model.layers.{i}.self_attn.{p}"] = LIN
        mods[f"model.layers.{i}.mlp"] = ModuleInfo("LlamaMLP")
        for p in ("gate_proj", "up_proj", "down_proj"):
            mods[f"model.layers.{i}.mlp.{p}"] = LIN
    mods["lm_head"] = LIN
    return mods


MODS = llama()


def sel(mods=MODS, output=(), **kw):
    return select_modules(cfg(**kw), mods, output)


# ------------------------------------------------------------------------------------------- target_modules


def test_list_entries_match_exactly_or_as_dotted_suffix():
    assert sel(target_modules=["q_proj"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert sel(target_modules=["layers.1.mlp.up_proj", "lm_head"]) == ["model.layers.1.mlp.up_proj", "lm_head"]
    # "proj" is not a whole segment of any name; "_proj" neither
    with pytest.raises(ConfigError):
        sel(target_modules=["proj", "_proj"])


def test_set_and_tuple_targets_are_lists_too():
    assert sel(target_modules={"o_proj"}) == sel(target_modules=("o_proj",)) == sel(target_modules=["o_proj"])


def test_string_target_is_a_full_regex_match():
    assert sel(target_modules=r".*1\.self_attn\.[qk]_proj") == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj",
    ]
    with pytest.raises(ConfigError):
        sel(target_modules="q_proj")  # a regex must match the whole name, not a suffix


def test_all_linear_any_case_skips_output_layers_and_takes_conv1d():
    linear = [n for n, i in MODS.items() if i.kind == "linear" and n != "lm_head"]
    assert sel(target_modules="ALL-linear", output={"lm_head"}) == linear
    assert sel(target_modules=ALL_LINEAR)[-1] == "lm_head"  # output layers are the caller's to name
    gpt2 = {"h.0.attn": BOX, "h.0.attn.c_attn": CONV1D, "wte": EMB, "lm_head": LIN}
    assert sel(gpt2, {"lm_head"}, target_modules="all-linear") == ["h.0.attn.c_attn"]


def test_output_layers_only_matter_for_all_linear():
    assert sel(output={"lm_head"}, target_modules=["lm_head"]) == ["lm_head"]


def test_embedding_is_wrappable():
    assert sel(target_modules=["embed_tokens"]) == ["model.embed_tokens"]


# ------------------------------------------------------------------------------------------- exclude_modules


def test_exclude_list_matches_exactly_or_as_suffix():
    got = sel(target_modules=["q_proj", "v_proj"], exclude_modules=["layers.0.self_attn.q_proj", "v_proj"])
    assert got == ["model.layers.1.self_attn.q_proj"]


def test_exclude_regex_is_a_full_match():
    got = sel(target_modules=["q_proj"], exclude_modules=r".*layers\.0\..*")
    assert got == ["model.layers.1.self_attn.q_proj"]
    assert sel(target_modules=["q_proj"], exclude_modules="layers") == sel(target_modules=["q_proj"])


# ---------------------------------------------------------------------------------------- layers_to_transform


def test_layers_to_transform_int_and_list():
    assert sel(target_modules=["q_proj"], layers_to_transform=1) == ["model.layers.1.self_attn.q_proj"]
    three = llama(3)
    got = sel(three, target_modules=["q_proj"], layers_to_transform=[0, 2], layers_pattern="layers")
    assert got == ["model.layers.0.self_attn.q_proj", "model.layers.2.self_attn.q_proj"]


def test_empty_layers_to_transform_list_means_all_layers():
    assert sel(target_modules=["q_proj"], layers_to_transform=[]) == sel(target_modules=["q_proj"])


def test_name_listed_exactly_bypasses_layers_to_transform():
    got = sel(target_modules=["model.layers.1.self_attn.q_proj", "k_proj"], layers_to_transform=[0])
    assert got == ["model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.q_proj"]


def test_long_lists_are_condensed_so_exact_names_no_longer_bypass_the_layer_filter():
    three = llama(3)
    linear = [n for n, i in three.items() if i.kind == "linear" and n != "lm_head"]
    assert len(linear) == 21
    long = sel(three, target_modules=linear, layers_to_transform=[0])
    assert long == [n for n in linear if ".layers.0." in n]
    assert sel(three, target_modules=linear[:19], layers_to_transform=[0]) == linear[:19]


def test_layer_filter_does_not_apply_to_names_without_an_index():
    got = sel(target_modules=["q_proj", "embed_tokens"], layers_to_transform=[0])
    assert got == ["model.layers.0.self_attn.q_proj"]


def test_layer_index_rules():
    assert layer_index("model.layers.3.mlp.up_proj") == 3
    assert layer_index("model.layers.1.experts.7.w1") == 1  # first index, not the expert's
    assert layer_index("encoder.block.1.layer.0.SelfAttention.q") == 1
    assert layer_index("encoder.block.1.layer.0.SelfAttention.q", "layer") == 0
    assert layer_index("layers.2.q") is None  # without a pattern two segments must precede the number
    assert layer_index("layers.2.q", "layers") == 2
    assert layer_index("model.layers.2.q", ["blocks", "layers"]) == 2
    assert layer_index("model.layers.2.q", "blocks") is None
    assert layer_index("model.layers.2") is None  # the number must be followed by another segment
    assert layer_index("model.layers.2.q", "") == layer_index("model.layers.2.q", []) == 2


# ------------------------------------------------------------------------------------------- modules_to_save


def test_modules_to_save_and_their_children_are_never_lora_targets():
    got = sel(target_modules=["q_proj", "down_proj"], modules_to_save=["layers.0.mlp"])
    assert got == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj",
    ]
    # a modules_to_save entry is a regex fragment spliced in as PEFT does
    with pytest.raises(ConfigError, match="excluded"):
        sel(target_modules=["q_proj"], modules_to_save=[r"layers\.\d"])


def test_is_module_to_save_is_a_plain_suffix_test():
    config = cfg(modules_to_save=["head"])
    assert is_module_to_save(config, "lm_head")
    assert not is_module_to_save(config, "lm_head.weight_x")
    assert select_modules_to_save(config, MODS) == ["lm_head"]
    # ... while the LoRA exclusion needs a whole segment, so lm_head can still be targeted
    assert sel(target_modules=["lm_head"], modules_to_save=["head"]) == ["lm_head"]


def test_task_heads_are_modules_to_save():
    assert modules_to_save(cfg(task_type="SEQ_CLS", modules_to_save=["pooler"])) == ["pooler", "classifier", "score"]
    assert modules_to_save(cfg(task_type="QUESTION_ANS")) == ["qa_outputs"]
    assert modules_to_save(cfg(task_type="CAUSAL_LM")) == []
    bert = {"bert.pooler.dense": LIN, "classifier": LIN}
    assert select_modules(cfg(target_modules="all-linear", task_type="TOKEN_CLS"), bert) == ["bert.pooler.dense"]
    assert is_module_to_save(cfg(task_type="SEQ_CLS"), "classifier")


# ---------------------------------------------------------------------------------------- rank and alpha


def test_pattern_key_first_in_dict_order_wins():
    name = "model.layers.0.self_attn.q_proj"
    assert pattern_key({"q_proj": 2, "model.layers.0.self_attn.q_proj": 6}, name) == "q_proj"
    assert pattern_key({"model.layers.0.self_attn.q_proj": 6, "q_proj": 2}, name) == "model.layers.0.self_attn.q_proj"


def test_pattern_key_matches_a_whole_dotted_suffix():
    name = "model.layers.0.self_attn.q_proj"
    assert pattern_key({"proj": 1}, name) is None
    assert pattern_key({"self_attn.q_proj": 1}, name) == "self_attn.q_proj"
    assert pattern_key({"layers.0.*": 1}, name) == "layers.0.*"
    assert pattern_key({".*proj": 1}, name) == ".*proj"
    assert pattern_key({"^q_proj": 1}, name) is None
    assert pattern_key({"^model.layers.0.self_attn.q_proj": 1}, name) is not None
    assert pattern_key({}, name) is None


def test_rank_alpha_looks_up_rank_and_alpha_separately():
    config = cfg(r=8, lora_alpha=16, rank_pattern={"q_proj": 4}, alpha_pattern={"layers.1.*": 3})
    assert rank_alpha(config, "model.layers.0.self_attn.q_proj") == (4, 16.0)
    assert rank_alpha(config, "model.layers.1.self_attn.q_proj") == (4, 3.0)
    assert rank_alpha(config, "model.layers.1.self_attn.k_proj") == (8, 3.0)
    assert rank_alpha(config, "lm_head") == (8, 16.0)
    assert rank_alpha(cfg(rank_pattern=None, alpha_pattern=None), "x") == (8, 8.0)


def test_unused_pattern_keys():
    assert unused_pattern_keys({"q_proj": 1, "nope": 2, "^lm_head": 3}, MODS) == ["nope"]


def test_anchored_key_matches_one_name_only():
    name = "model.layers.1.self_attn.q_proj"
    key = anchored_pattern_key(name)
    assert key == r"^model\.layers\.1\.self_attn\.q_proj"
    others = [name, "base." + name, "model_layers_1_self_attn_q_proj", "model.layers.1.self_attn.q_proj2"]
    assert [n for n in others if pattern_key({key: 1}, n)] == [name]
    # the unescaped form also matches a name that differs only where the dots are
    assert pattern_key({"^" + name: 1}, "model_layers_1_self_attn_q_proj") is not None


# -------------------------------------------------------------------------------------- exact_target_modules


def _selects(targets, names):
    if isinstance(targets, str):
        return {n for n in names if re.fullmatch(targets, n)}
    return {n for n in names if any(n == t or n.endswith("." + t) for t in targets)}


def test_exact_target_modules_prefers_leaf_names():
    chosen = [n for n in MODS if n.endswith(("q_proj", "v_proj"))]
    assert exact_target_modules(chosen, list(MODS)) == ["q_proj", "v_proj"]


def test_exact_target_modules_uses_full_names_where_a_leaf_would_take_too_much():
    chosen = [n for n in MODS if n.endswith("q_proj")] + ["model.layers.0.self_attn.v_proj"]
    got = exact_target_modules(chosen, list(MODS))
    assert got == ["model.layers.0.self_attn.v_proj", "q_proj"]
    assert _selects(got, MODS) == set(chosen)


def test_exact_target_modules_falls_back_to_a_regex_for_nested_names():
    names = ["a", "a.b", "x", "x.a", "x.a.b"]
    got = exact_target_modules(["a.b"], names)
    assert isinstance(got, str) and _selects(got, names) == {"a.b"}


def test_exact_target_modules_refuses_bad_selections():
    with pytest.raises(ConfigError, match=r"'nope'.*not modules of the model"):
        exact_target_modules(["nope"], list(MODS))
    with pytest.raises(ConfigError, match="selection is empty"):
        exact_target_modules([], list(MODS))


# -------------------------------------------------------------------------------------------------- errors


def test_nearest_names():
    assert nearest_names("q_prj", MODS, n=2)[0] == "q_proj"
    assert nearest_names("zzzzzz", MODS) == []


def test_target_modules_none_is_refused():
    with pytest.raises(ConfigError, match="target_modules is not set.*all-linear"):
        sel()


def test_nothing_matches_lists_targets_and_nearest_names():
    with pytest.raises(ConfigError) as info:
        sel(target_modules=["q_prj", "lm_haed"], layers_to_transform=[3], layers_pattern="layers")
    msg = str(info.value)
    assert "target_modules=['lm_haed', 'q_prj']" in msg
    assert "layers_to_transform=[3], layers_pattern='layers'" in msg
    assert "'q_prj' -> q_proj" in msg and "'lm_haed' -> lm_head" in msg
    assert "matches none of the model's" in msg


def test_all_linear_without_linear_layers():
    with pytest.raises(ConfigError, match="'all-linear' found no nn.Linear or Conv1D layer besides the output"):
        sel({"lm_head": LIN, "wte": EMB}, {"lm_head"}, target_modules="all-linear")


def test_all_matches_excluded_is_its_own_message():
    with pytest.raises(ConfigError, match=r"every module it matches is excluded.*'model.layers.0.self_attn.q_proj'"):
        sel(target_modules=["q_proj"], exclude_modules=["q_proj"])


def test_unwrappable_modules_are_all_listed():
    with pytest.raises(ConfigError) as info:
        sel(target_modules=["self_attn", "mlp"])
    msg = str(info.value)
    assert "4 module(s) LoRA cannot wrap" in msg
    assert "'model.layers.0.self_attn' (LlamaAttention)" in msg and "'model.layers.1.mlp' (LlamaMLP)" in msg
    assert "exclude_modules" in msg


def test_grouped_conv_needs_rank_divisible_by_groups():
    mods = {"conv": ModuleInfo("Conv2d", "conv2d", False, (4, 2, 3, 3), True, groups=2)}
    assert select_modules(cfg(target_modules=["conv"], r=4), mods) == ["conv"]
    assert select_modules(cfg(target_modules=["conv"], r=3, rank_pattern={"conv": 2}), mods) == ["conv"]
    with pytest.raises(ConfigError,
                       match=r"multiple of its groups \(2, 4, 8, ...\).*'conv' \(Conv2d, groups=2\) has rank 3"):
        select_modules(cfg(target_modules=["conv"], r=3), mods)


def test_multihead_attention_is_selected_like_any_module():
    mods = {"attn": ModuleInfo("MultiheadAttention"), "attn.out_proj": LIN}
    assert select_modules(cfg(target_modules=["attn"]), mods) == ["attn"]
    assert select_modules(cfg(target_modules=["out_proj"]), mods) == ["attn.out_proj"]


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(target_parameters=["experts.w1"]), "target_parameters"),
        (dict(layer_replication=[[0, 2]]), "layer_replication"),
        (dict(ensure_weight_tying=True, target_modules=["embed_tokens"]), "ensure_weight_tying.*embed_tokens"),
        (dict(ensure_weight_tying=True, modules_to_save=["embed_tokens"]), "ensure_weight_tying.*embed_tokens"),
    ],
)
def test_unsupported_fields(kw, match):
    kw.setdefault("target_modules", ["q_proj"])
    with pytest.raises(UnsupportedError, match=match):
        sel(**kw)


def test_ensure_weight_tying_without_embeddings_is_fine():
    assert sel(target_modules=["q_proj"], ensure_weight_tying=True) == sel(target_modules=["q_proj"])


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(target_modules="q_proj("), r"target_modules: 'q_proj\('"),
        (dict(target_modules=["q_proj"], exclude_modules="[x"), r"exclude_modules: '\[x'"),
        (dict(target_modules=["q_proj"], modules_to_save=["(x"]), r"modules_to_save: '\(x'"),
        (dict(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="l(s"), r"layers_pattern: 'l\(s'"),
    ],
)
def test_invalid_regexes_name_the_field(kw, field):
    with pytest.raises(ConfigError, match=rf"{field} is not a valid regular expression"):
        sel(**kw)


def test_invalid_pattern_key_names_the_field():
    with pytest.raises(ConfigError, match=r"rank_pattern key: 'q\(' is not a valid regular expression"):
        rank_alpha(cfg(rank_pattern={"q(": 2}), "a.q")
    with pytest.raises(ConfigError, match=r"alpha_pattern key: '\[' is not a valid"):
        rank_alpha(cfg(alpha_pattern={"[": 2}), "a.q")


def test_rank_alpha_fields_round_trip_through_peft_rules():
    from types import SimpleNamespace

    from lorasurg.targeting import rank_alpha_fields

    wanted = {"model.layers.0.q_proj": (16, 32.0), "model.layers.0.v_proj": (8, 16.0),
              "model.layers.1.q_proj": (16, 8.5), "layers.1.q_proj": (4, 4.0)}
    fields = rank_alpha_fields(wanted)
    assert fields["r"] == 16 and fields["lora_alpha"] == 32 and isinstance(fields["lora_alpha"], int)
    config = SimpleNamespace(**fields)
    for module, (r, alpha) in wanted.items():
        assert rank_alpha(config, module) == (r, alpha), module
    assert len(fields["rank_pattern"]) == 2 and len(fields["alpha_pattern"]) == 3
