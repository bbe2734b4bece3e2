"""Targeting parity: the modules PEFT wraps with LoRA, and the r/alpha it gives each, equal lorasurg's.

Each case builds a ``peft.LoraConfig``, runs ``get_peft_model`` on a deep copy of a tiny transformers model
(built once per module from a config, no hub), collects every ``LoraLayer`` (name, r, lora_alpha) and every
``ModulesToSaveWrapper``, and compares with :func:`select_modules`, :func:`rank_alpha` and
:func:`select_modules_to_save` on :func:`describe_model`'s description of the same model.
"""

from __future__ import annotations

import copy
import random
import warnings

import pytest

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from torch import nn  # noqa: E402

from lorasurg.errors import ConfigError  # noqa: E402
from lorasurg.modules import describe_model, output_layer_names  # noqa: E402
from lorasurg.targeting import (  # noqa: E402
    anchored_pattern_key,
    exact_target_modules,
    rank_alpha,
    select_modules,
    select_modules_to_save,
)

pytestmark = [pytest.mark.parity, pytest.mark.filterwarnings("ignore")]

_PREFIX = "base_model.model."


def _llama():
    cfg = transformers.LlamaConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, vocab_size=64, max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(cfg)


def _gpt2():
    cfg = transformers.GPT2Config(
        n_embd=16, n_layer=2, n_head=2, n_positions=32, vocab_size=64, bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg)


def _bert():
    cfg = transformers.BertConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, vocab_size=64,
        max_position_embeddings=32, num_labels=3,
    )
    return transformers.BertForSequenceClassification(cfg)


def _t5():
    cfg = transformers.T5Config(
        d_model=16, d_ff=24, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=2, vocab_size=64,
    )
    return transformers.T5ForConditionalGeneration(cfg)


class _Odd(nn.Module):
    """Names that differ only where the dots are (``a.b`` vs ``a_b``), and a grouped conv."""

    def __init__(self):
        super().__init__()
        self.a = nn.Module()
        self.a.b = nn.Linear(4, 4)
        self.a_b = nn.Linear(4, 4)
        self.conv = nn.Conv1d(4, 4, 3, groups=2)


_BUILDERS = {"llama": _llama, "gpt2": _gpt2, "bert": _bert, "t5": _t5, "odd": _Odd}
_TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM", "odd": None}


@pytest.fixture(scope="module")
def models():
    """One tiny model per architecture, built once for the whole module (cases deep-copy it for PEFT)."""
    torch.manual_seed(0)
    return {arch: build() for arch, build in _BUILDERS.items()}


def _peft_wraps(model, config):
    """({name: (r, lora_alpha)} of PEFT's LoRA layers, [names PEFT wraps as modules to save])."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(model), copy.deepcopy(config))
    lora, saved = {}, []
    for name, module in peft_model.named_modules():
        name = name.removeprefix(_PREFIX)
        if isinstance(module, LoraLayer):
            lora[name] = (module.r["default"], module.lora_alpha["default"])
        elif type(module).__name__ == "ModulesToSaveWrapper":
            saved.append(name)
    return lora, saved


def _ours(model, config):
    modules = describe_model(model)
    output = output_layer_names(model, config.task_type)
    names = select_modules(copy.deepcopy(config), modules, output)
    return {n: rank_alpha(config, n) for n in names}, select_modules_to_save(config, modules)


def _check(model, config):
    theirs, theirs_saved = _peft_wraps(model, config)
    ours, ours_saved = _ours(model, config)
    assert ours == theirs
    assert ours_saved == theirs_saved
    return ours


def _llama_linear(n):
    names = []
    for i in range(3):
        names += [f"model.layers.{i}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        names += [f"model.layers.{i}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    return names[:n]


CASES = {
    "llama": [
        dict(target_modules=["q_proj", "v_proj"]),
        dict(target_modules=["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]),
        dict(target_modules=["self_attn.o_proj", "embed_tokens"]),
        dict(target_modules=r".*\.(q|k)_proj"),
        dict(target_modules=r"model\.layers\.1\..*_proj"),
        dict(target_modules="all-linear"),
        dict(target_modules="ALL-Linear"),
        dict(target_modules="all-linear", exclude_modules=["down_proj", "model.layers.0.self_attn.q_proj"]),
        dict(target_modules=["q_proj", "up_proj"], exclude_modules=r".*layers\.0\..*"),
        dict(target_modules=["q_proj", "v_proj"], layers_to_transform=1),
        dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 2], layers_pattern="layers"),
        dict(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern=["blocks", "layers"]),
        dict(target_modules=["q_proj"], layers_to_transform=[]),
        # a name listed exactly bypasses layers_to_transform ...
        dict(target_modules=["model.layers.2.self_attn.q_proj", "v_proj"], layers_to_transform=[0]),
        # ... unless the list has >= 20 entries, which PEFT first shortens to suffixes
        dict(target_modules=_llama_linear(21), layers_to_transform=[0]),
        dict(target_modules=_llama_linear(19), layers_to_transform=[0]),
        dict(target_modules=["down_proj", "q_proj"], modules_to_save=["layers.0.mlp"]),
        dict(target_modules=["q_proj"], modules_to_save=["head"]),  # plain suffix: takes lm_head
        dict(target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens"], task_type="CAUSAL_LM"),
        dict(target_modules=["q_proj", "v_proj", "o_proj"], r=8, lora_alpha=16,
             rank_pattern={"q_proj": 4, "self_attn.v_proj": 6}, alpha_pattern={"v_proj": 3, "layers.2.*": 5}),
        dict(target_modules="all-linear", rank_pattern={"layers.0.*": 2, "mlp.*": 12}),
        # dict order decides between keys that both match
        dict(target_modules=["q_proj"], rank_pattern={"q_proj": 2, "model.layers.0.self_attn.q_proj": 6}),
        dict(target_modules=["q_proj"], rank_pattern={"model.layers.0.self_attn.q_proj": 6, "q_proj": 2}),
        dict(target_modules=["q_proj"], rank_pattern={"^model.layers.1.self_attn.q_proj": 3, "nothing": 5}),
        dict(target_modules=["q_proj"], rank_pattern={"^q_proj": 3}),  # anchored leaf never matches
    ],
    "gpt2": [
        dict(target_modules=["c_attn"]),
        dict(target_modules=["c_attn", "c_proj"]),
        dict(target_modules=["attn.c_proj", "wte"]),
        dict(target_modules="all-linear"),
        dict(target_modules=r".*h\.1\.mlp\.c_fc"),
        dict(target_modules=["c_attn", "c_fc"], layers_to_transform=[1], layers_pattern="h"),
        dict(target_modules=["c_attn", "c_fc"], layers_to_transform=0),
        dict(target_modules="all-linear", exclude_modules=["mlp.c_proj"]),
        dict(target_modules=["c_attn", "c_fc"], rank_pattern={"c_attn": 4, "h.1.*": 2}, alpha_pattern={"c_fc": 1}),
    ],
    "bert": [
        dict(target_modules=["query", "value"], task_type="SEQ_CLS"),
        dict(target_modules="all-linear", task_type="SEQ_CLS"),
        dict(target_modules="all-linear"),  # no task type: classifier is not an output embedding, so it is kept
        dict(target_modules=["dense"], task_type="SEQ_CLS"),
        dict(target_modules=["attention.output.dense", "classifier"], task_type="SEQ_CLS"),
        dict(target_modules=["query", "key"], layers_to_transform=[1], layers_pattern="layer", task_type="SEQ_CLS"),
        dict(target_modules=["query", "key"], layers_to_transform=[1], task_type="SEQ_CLS"),
        dict(target_modules=r".*encoder\.layer\.0\..*(query|key)", task_type="SEQ_CLS"),
        dict(target_modules="all-linear", modules_to_save=["pooler"], task_type="SEQ_CLS"),
        dict(target_modules=["query", "value", "dense"], exclude_modules=r".*output\.dense", task_type="SEQ_CLS"),
        dict(target_modules=["query", "value"], rank_pattern={"layer.1.attention.self.query": 2},
             alpha_pattern={"value": 32}, task_type="SEQ_CLS"),
    ],
    "t5": [
        dict(target_modules=["q", "v"]),
        dict(target_modules="all-linear", task_type="SEQ_2_SEQ_LM"),
        dict(target_modules=["SelfAttention.q", "EncDecAttention.k"]),
        dict(target_modules=["q", "o"], layers_to_transform=[1], layers_pattern="block"),
        dict(target_modules=["q", "wo"], layers_to_transform=[0]),
        dict(target_modules=["q", "wi", "wo"], exclude_modules=["wo"]),
        dict(target_modules=r"decoder\..*\.(q|k|v)"),
        dict(target_modules=["relative_attention_bias", "q"]),
        dict(target_modules=["q", "v"], rank_pattern={"encoder.*": 2, "v": 4}, alpha_pattern={"decoder.*q": 7}),
    ],
    "odd": [
        dict(target_modules=["b", "a_b"], rank_pattern={"^a.b": 3}),  # unescaped dot: a_b matches too
        dict(target_modules=["b", "a_b"], rank_pattern={anchored_pattern_key("a.b"): 3}),
        dict(target_modules=["conv"], r=4),
    ],
}


@pytest.mark.parametrize(
    "arch,kwargs", [(arch, kw) for arch, cases in CASES.items() for kw in cases],
    ids=[f"{arch}-{i}" for arch, cases in CASES.items() for i in range(len(cases))],
)
def test_selection_and_ranks_match_peft(models, arch, kwargs):
    kwargs = dict(kwargs)
    kwargs.setdefault("task_type", None)
    ours = _check(models[arch], LoraConfig(**kwargs))
    assert ours  # every case selects something


def test_condensing_changes_the_layer_filter(models):
    # the two cases above differ only in list length; PEFT's shortening makes layers_to_transform apply
    config = dict(layers_to_transform=[0])
    long = _ours(models["llama"], LoraConfig(target_modules=_llama_linear(21), **config))[0]
    short = _ours(models["llama"], LoraConfig(target_modules=_llama_linear(19), **config))[0]
    assert len(long) == 7 and all(".layers.0." in n for n in long)
    assert len(short) == 19


def test_unescaped_anchor_matches_two_modules_escaped_one(models):
    loose = _ours(models["odd"], LoraConfig(target_modules=["b", "a_b"], rank_pattern={"^a.b": 3}))[0]
    tight = _ours(models["odd"], LoraConfig(target_modules=["b", "a_b"], rank_pattern={r"^a\.b": 3}))[0]
    assert loose == {"a.b": (3, 8.0), "a_b": (3, 8.0)}
    assert tight == {"a.b": (3, 8.0), "a_b": (8, 8.0)}


ERROR_CASES = [
    ("llama", dict(target_modules=["q_prj"])),
    ("llama", dict(target_modules=["self_attn"])),
    ("llama", dict(target_modules=["q_proj"], exclude_modules=["q_proj"])),
    ("llama", dict(target_modules=["q_proj"], layers_to_transform=[7])),
    ("llama", dict(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="blocks")),
    ("gpt2", dict(target_modules=["attn"])),
    ("bert", dict(target_modules=["classifier"], task_type="SEQ_CLS")),
    ("t5", dict(target_modules=r".*SelfAttention")),
    ("odd", dict(target_modules=["conv"], r=3)),
]


@pytest.mark.parametrize("arch,kwargs", ERROR_CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(ERROR_CASES)])
def test_refusals_match_peft(models, arch, kwargs):
    kwargs.setdefault("task_type", None)
    config = LoraConfig(**kwargs)
    with pytest.raises(ValueError):
        _peft_wraps(models[arch], config)
    with pytest.raises(ConfigError):
        _ours(models[arch], config)


def _subsets(names, seed):
    rng = random.Random(seed)
    yield names[:1]
    yield names
    for size in (2, len(names) // 2, max(1, len(names) - 2)):
        yield rng.sample(names, size)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "t5"])
def test_exact_target_modules_makes_peft_wrap_exactly_that_set(models, arch):
    model = models[arch]
    modules = describe_model(model)
    wrappable = [n for n, info in modules.items() if info.kind is not None and "lm_head" not in n]
    wrappable = [n for n in wrappable if not n.endswith(("classifier",))]  # a SEQ_CLS head is never LoRA-targeted
    for seed, chosen in enumerate(_subsets(wrappable, seed=len(arch))):
        targets = exact_target_modules(chosen, list(modules))
        theirs, _ = _peft_wraps(model, LoraConfig(target_modules=targets, task_type=_TASK[arch]))
        assert set(theirs) == set(chosen), (seed, targets)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "t5"])
def test_anchored_key_gives_exactly_one_module_its_rank(models, arch):
    model = models[arch]
    modules = describe_model(model)
    selected = select_modules(LoraConfig(target_modules="all-linear"), modules, output_layer_names(model))
    for name in (selected[0], selected[len(selected) // 2], selected[-1]):
        config = LoraConfig(target_modules="all-linear", r=8, rank_pattern={anchored_pattern_key(name): 3})
        theirs, _ = _peft_wraps(model, config)
        assert {n for n, (r, _) in theirs.items() if r == 3} == {name}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "t5"])
def test_condensing_equals_peft_find_minimal_target_modules(models, arch):
    from peft.tuners.tuners_utils import _find_minimal_target_modules

    from lorasurg.targeting import _condense

    names = list(describe_model(models[arch]))
    wrappable = [n for n, info in describe_model(models[arch]).items() if info.kind is not None]
    for chosen in _subsets(wrappable, seed=7):
        others = [n for n in names if not any(n == t or n.endswith("." + t) for t in chosen)]
        theirs = _find_minimal_target_modules(chosen, others)
        theirs = theirs if len(theirs) < len(set(chosen)) else set(chosen)
        assert _condense(chosen, others) == theirs
