"""Broken adapters, one per ``lorasurg validate`` finding code, generated (never hand-edited).

Each :class:`Case` writes a small adapter (or config) for the tiny Llama in ``fixtures/tiny-llama/base``
(hidden 64, intermediate 128, 2 layers, k/v projections 32 wide, vocabulary 256) into a directory, starting
from a consistent adapter (:func:`clean_adapter`: seeded random factors of the right shapes for the modules
the config selects) and breaking exactly one thing. :data:`CASES` maps each code of
:data:`lorasurg.findings.CODES` to its case, with the ``where`` and message the finding must have.

Run ``python -m tests.surgery.validate.broken OUT`` (from the repository root) to write every case into
``OUT/<code>`` and look at them.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from safetensors.torch import load_file, save_file

from lorasurg import Checkpoint, LoraConfig
from lorasurg.io.adapter import CONFIG_NAME, WEIGHTS_NAME, Adapter, AdapterModule
from lorasurg.targeting import anchored_pattern_key, select_modules

ROOT = Path(__file__).resolve().parents[3]
LLAMA = ROOT / "fixtures" / "tiny-llama" / "base"
GPT2 = ROOT / "fixtures" / "tiny-gpt2" / "base"
Q0 = "model.layers.0.self_attn.q_proj"
TOKENS = "token_adapter.trainable_tokens_delta"


def clean_adapter(targets=("q_proj", "v_proj"), r: int = 4, seed: int = 0, base: Path = LLAMA, **config) -> Adapter:
    """A consistent adapter on ``base``: random factors (B nonzero) of rank r (rank_pattern applied) for every
    module the config selects; ``lora_bias``/``use_dora`` get their tensors."""
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), **config)
    gen = torch.Generator().manual_seed(seed)
    with Checkpoint.open(base) as ckpt:
        infos = ckpt.module_infos()
        outputs = ckpt.output_layer_names()
    modules = {}
    for name in select_modules(cfg, infos, outputs):
        info = infos[name]
        rank, _ = Adapter(cfg).rank_alpha(name)
        a_shape, b_shape, out = info.lora_shapes(rank)
        modules[name] = AdapterModule(
            name, torch.randn(a_shape, generator=gen) * 0.1, torch.randn(b_shape, generator=gen) * 0.1,
            bias=torch.randn(out, generator=gen) * 0.1 if cfg.lora_bias else None,
            magnitude=torch.rand(out, generator=gen) + 0.5 if cfg.use_dora else None,
            embedding=info.kind == "embedding",
        )
    return Adapter(cfg, modules)


def save(adapter: Adapter, directory: Path, **config_changes) -> Path:
    """Save ``adapter``, then overwrite keys of its adapter_config.json with ``config_changes`` (raw JSON, so
    values LoraConfig would refuse can be written)."""
    adapter.save(directory, force=True)
    if config_changes:
        path = directory / CONFIG_NAME
        data = json.loads(path.read_text())
        data.update(config_changes)
        path.write_text(json.dumps(data, indent=2))
    return directory


def edit_tensors(directory: Path, change: Callable[[dict], None]) -> Path:
    """Rewrite the adapter's weights file after ``change(state)`` edits its ``{key: tensor}`` in place."""
    state = load_file(directory / WEIGHTS_NAME)
    change(state)
    save_file(state, directory / WEIGHTS_NAME)
    return directory


def config_only(directory: Path, **config) -> Path:
    """Write only an adapter_config.json (a training config) and return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    return LoraConfig(**config).save_pretrained(directory)


def _key(module: str, part: str) -> str:
    return f"base_model.model.{module}.{part}"


def gguf_file(d: Path, *, general_type: str = "adapter", adapter_type: str = "lora", alpha: Optional[float] = 8.0,
              arch: str = "llama", extra: Optional[str] = None) -> Path:
    """A GGUF LoRA file for the tiny Llama written with the gguf package itself: one pair on blk.0.attn_v.weight
    (lora_a (4, 64), lora_b (32, 4)), the given metadata, and optionally one more tensor named ``extra``."""
    import gguf
    import numpy as np

    d.mkdir(parents=True, exist_ok=True)
    path = d / "adapter.gguf"
    writer = gguf.GGUFWriter(path, arch)
    writer.add_type(general_type)
    writer.add_string(gguf.Keys.Adapter.TYPE, adapter_type)
    if alpha is not None:
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    rng = np.random.default_rng(0)
    writer.add_tensor("blk.0.attn_v.weight.lora_a", rng.standard_normal((4, 64)).astype(np.float32))
    writer.add_tensor("blk.0.attn_v.weight.lora_b", rng.standard_normal((32, 4)).astype(np.float32))
    if extra:
        writer.add_tensor(extra, rng.standard_normal((4, 64)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ----------------------------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    """How to write one broken adapter, and the finding it must give.

    Attributes:
        build: writes into the directory it is given; returns the PATH to validate.
        where: the finding's ``where`` must end with this.
        message: a regex the finding's message must match (``re.search``).
        base: validate against the tiny Llama (else without ``--base``), or against this base.
        consumers: validate ``--for`` these (the ``consumer-*`` codes).
    """

    build: Callable[[Path], Path]
    where: str
    message: str
    base: Union[bool, Path] = True
    consumers: Optional[str] = None


def _file_missing(d: Path) -> Path:
    save(clean_adapter(), d)
    (d / WEIGHTS_NAME).unlink()
    return d


def _file_unreadable(d: Path) -> Path:
    save(clean_adapter(), d)
    data = (d / WEIGHTS_NAME).read_bytes()
    (d / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    return d


def _file_bin(d: Path) -> Path:
    save(clean_adapter(), d)
    torch.save(load_file(d / WEIGHTS_NAME), d / "adapter_model.bin")
    (d / WEIGHTS_NAME).unlink()
    return d


def _key_foreign(d: Path) -> Path:
    return edit_tensors(save(clean_adapter(), d), lambda s: s.update({"stray.weight": torch.ones(3)}))


def _module_incomplete(d: Path) -> Path:
    return edit_tensors(save(clean_adapter(), d), lambda s: s.pop(_key(Q0, "lora_B.weight")))


def _rank_inconsistent(d: Path) -> Path:
    return edit_tensors(save(clean_adapter(), d),
                        lambda s: s.update({_key(Q0, "lora_B.weight"): torch.ones(64, 3)}))


def _bias_unflagged(d: Path) -> Path:
    return edit_tensors(save(clean_adapter(), d), lambda s: s.update({_key(Q0, "lora_B.bias"): torch.ones(64)}))


def _bias_shape(d: Path) -> Path:
    return edit_tensors(save(clean_adapter(lora_bias=True), d),
                        lambda s: s.update({_key(Q0, "lora_B.bias"): torch.ones(5)}))


def _magnitude_unflagged(d: Path) -> Path:
    return edit_tensors(save(clean_adapter(), d),
                        lambda s: s.update({_key(Q0, "lora_magnitude_vector"): torch.ones(64)}))


def _magnitude_shape(d: Path) -> Path:
    return edit_tensors(save(clean_adapter(use_dora=True), d),
                        lambda s: s.update({_key(Q0, "lora_magnitude_vector"): torch.ones(7)}))


def _without_tensors(**config) -> Callable[[Path], Path]:
    """An adapter made with ``config`` whose bias/magnitude tensors are then removed."""

    def build(d: Path) -> Path:
        adapter = clean_adapter(**config)
        for mod in adapter.modules.values():
            mod.bias = mod.magnitude = None
        return save(adapter, d)

    return build


def _dtype_mixed(d: Path) -> Path:
    adapter = clean_adapter()
    adapter.modules[Q0].A = adapter.modules[Q0].A.to(torch.bfloat16)
    return save(adapter, d)


def _module_missing(d: Path) -> Path:
    adapter = clean_adapter()
    moved = "model.layers.7.self_attn.q_proj"
    adapter.modules[moved] = AdapterModule(moved, adapter.modules[Q0].A.clone(), adapter.modules[Q0].B.clone())
    return save(adapter, d)


def _kind_mismatch(d: Path) -> Path:
    adapter = clean_adapter()
    mod = adapter.modules[Q0]
    adapter.modules[Q0] = AdapterModule(Q0, mod.A, mod.B, embedding=True)
    return save(adapter, d)


def _shape_mismatch(d: Path) -> Path:
    adapter = clean_adapter()
    adapter.modules[Q0].A = torch.ones(4, 32)
    return save(adapter, d)


def _extra(key: str, shape: tuple[int, ...], **config) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        adapter = clean_adapter(**config)
        adapter.extra[key] = torch.ones(shape)
        return save(adapter, d)

    return build


def _value_nonfinite(d: Path) -> Path:
    adapter = clean_adapter()
    adapter.modules[Q0].A[1, 2] = float("nan")
    adapter.modules[Q0].A[0, 0] = float("inf")
    return save(adapter, d)


def _untrained(d: Path) -> Path:
    adapter = clean_adapter()
    for mod in adapter.modules.values():
        mod.B = torch.zeros_like(mod.B)
    return save(adapter, d)


def _configured(changes: dict, **config) -> Callable[[Path], Path]:
    return lambda d: save(clean_adapter(**config), d, **changes)


def _training_config(**config) -> Callable[[Path], Path]:
    return lambda d: config_only(d, **config)


CASES: dict[str, Case] = {
    "file-missing": Case(_file_missing, WEIGHTS_NAME, r"has a config but neither adapter_model.safetensors"),
    "file-unreadable": Case(_file_unreadable, WEIGHTS_NAME, r"not a readable safetensors file: its header describes"),
    "file-bin": Case(_file_bin, "adapter_model.bin", r"pickle file \(read here with torch.load\(weights_only=True\)\)"),
    "key-foreign": Case(_key_foreign, "stray.weight", r"does not start with 'base_model.model.'"),
    "module-incomplete": Case(_module_incomplete, Q0, r"lacks lora_A or lora_B \(has \['A'\]\)"),
    "config-invalid": Case(_configured({"lora_bias": True, "use_dora": True}), CONFIG_NAME,
                           r"lora_bias=True is not supported with use_dora=True"),
    "config-warning": Case(_configured({"loftq_config": {"loftq_bits": 4}}), CONFIG_NAME,
                           r"loftq_config is ignored \(reset to \{\}\) because init_lora_weights is True"),
    "config-unknown-key": Case(_configured({"future_field": [1, 2]}), "future_field",
                               r"future_field=\[1, 2\] is not a field of PEFT 0.21.2's LoraConfig"),
    "init-reinit": Case(_configured({"init_lora_weights": "pissa"}), "init_lora_weights",
                        r"init_lora_weights='pissa' in a saved adapter: PEFT runs this init again"),
    "alpha-sign": Case(_configured({"lora_alpha": -8}), "lora_alpha",
                       r"lora_alpha is -8: the modules it applies to get a negative scale: PEFT .* subtract"),
    "target-unmatched": Case(_training_config(target_modules=["q_proj", "v_prj"]), "target_modules['v_prj']",
                             r"'v_prj' is neither a module name of .*tiny-llama/base nor a '.'-suffix of one"),
    "target-none-selected": Case(_training_config(target_modules=["q_proj"], exclude_modules=["self_attn.q_proj"]),
                                 "target_modules", r"matches 2 module\(s\) of .* but selects none"),
    "target-unsupported": Case(_training_config(target_modules=["q_proj", "input_layernorm"]),
                               "model.layers.0.input_layernorm",
                               r"selects it but LoRA cannot wrap it \(Unknown, weight \(64,\)\); PEFT refuses it"),
    "exclude-unmatched": Case(_training_config(target_modules=["q_proj"], exclude_modules=["k_proj"]),
                              "exclude_modules['k_proj']", r"'k_proj' excludes none of the 2 modules"),
    "layers-out-of-range": Case(_training_config(target_modules=["q_proj"], layers_to_transform=[0, 5]),
                                "layers_to_transform", r"\[5\] are not layers of .*; its layers are 0-1"),
    "layers-pattern-unmatched": Case(
        _training_config(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="blocks"),
        "layers_pattern", r"no module name of .* has 'blocks' followed by a layer number"),
    "pattern-unmatched": Case(_configured({"rank_pattern": {"^model.layers.0": 2}}), "rank_pattern['^model.layers.0']",
                              r"matches none of the 4 targeted modules, so PEFT ignores it silently and every "
                              r"targeted module keeps r=4"),
    "rank-too-large": Case(_training_config(target_modules=["k_proj"], r=48), "model.layers.0.self_attn.k_proj",
                           r"r=48 but its delta is 32x64: at most rank 32 is usable, 16 of the rank is wasted"),
    "save-unmatched": Case(_training_config(target_modules=["q_proj"], modules_to_save=["lm_haed"]),
                           "modules_to_save['lm_haed']", r"'lm_haed' matches no module of"),
    "tensor-untargeted": Case(_configured({"target_modules": ["q_proj"]}), "model.layers.1.self_attn.v_proj",
                              r"has LoRA tensors but target_modules=\['q_proj'\] does not select it"),
    "rank-mismatch": Case(_configured({"r": 8}), Q0, r"stored rank 4, config gives r=8"),
    "rank-inconsistent": Case(_rank_inconsistent, Q0, r"A has 4 rows but B has 3 columns"),
    "bias-unflagged": Case(_bias_unflagged, Q0, r"has lora_B.bias but lora_bias is false"),
    "bias-missing": Case(_without_tensors(lora_bias=True), Q0, r"lora_bias is true but lora_B.bias is missing"),
    "bias-on-embedding": Case(_configured({"lora_bias": True}, targets=("embed_tokens",)), "model.embed_tokens",
                              r"PEFT cannot give an embedding a lora_B bias"),
    "bias-shape": Case(_bias_shape, Q0, r"lora_B.bias has shape \(5,\), expected \(64,\)"),
    "magnitude-missing": Case(_without_tensors(use_dora=True), Q0, r"use_dora is true but lora_magnitude_vector is"),
    "magnitude-unflagged": Case(_magnitude_unflagged, Q0, r"has lora_magnitude_vector but use_dora is false"),
    "magnitude-shape": Case(_magnitude_shape, Q0, r"lora_magnitude_vector has 7 entries, expected 64"),
    "save-tensor-missing": Case(_configured({"modules_to_save": ["lm_head"]}), "lm_head",
                                r"modules_to_save selects it but the adapter lacks \['lm_head.weight'\]"),
    "dtype-mixed": Case(_dtype_mixed, "lora_A", r"stored in 2 dtypes: 3 float32, 1 bfloat16 \(bfloat16 in \['model"),
    "module-missing": Case(_module_missing, "model.layers.7.self_attn.q_proj", r"has no module of that name"),
    "kind-mismatch": Case(_kind_mismatch, Q0, r"factors are shaped for a layer of kind 'embedding'.* Linear"),
    "shape-mismatch": Case(_shape_mismatch, Q0, r"lora_A is \(4, 32\), the layer needs \(4, 64\)"),
    "extra-unmatched": Case(_extra("classifier.weight", (3, 64)), "classifier.weight",
                            r"shape \(3, 64\) for which .* has no 'classifier.weight'"),
    "replication-invalid": Case(_training_config(target_modules=["q_proj"], layer_replication=[[0, 2], [1, 3]]),
                                "layer_replication", r"\[1, 3\) is not a range of the model's 2 layers"),
    "tokens-unflagged": Case(_extra(f"model.embed_tokens.{TOKENS}", (2, 64)), f"model.embed_tokens.{TOKENS}",
                             r"trainable_token_indices does not name model.embed_tokens"),
    "tokens-missing": Case(_configured({}, trainable_token_indices={"embed_tokens": [1, 2]}),
                           "trainable_token_indices['embed_tokens']", r"the file holds no rows for it"),
    "tokens-shape": Case(_extra(f"model.embed_tokens.{TOKENS}", (3, 64),
                                trainable_token_indices={"embed_tokens": [1, 2]}),
                         f"model.embed_tokens.{TOKENS}", r"2 indices but rows of shape \(3, 64\)"),
    "tokens-conflict": Case(_extra(f"lm_head.{TOKENS}", (1, 64), targets=("q_proj", "lm_head"),
                                   trainable_token_indices={"lm_head": [5]}),
                            "lm_head", r"also a LoRA target: PEFT refuses the adapter"),
    "tokens-need-resize": Case(_extra(f"model.embed_tokens.{TOKENS}", (2, 64),
                                      trainable_token_indices={"embed_tokens": [3, 258]}),
                               f"model.embed_tokens.{TOKENS}", r"past the base's 256 rows \(up to 258\).*"),
    "value-nonfinite": Case(_value_nonfinite, _key(Q0, "lora_A.weight"), r"1 NaN and 1 inf among its 256 values"),
    "untrained": Case(_untrained, "lora_B", r"all zeros in every one of the 4 modules: the adapter changes nothing"),
    "consumer-refuses": Case(lambda d: save(clean_adapter(lora_bias=True), d), f"vllm: {Q0} and 3 more",
                             r"vLLM refuses lora_B.bias tensors \(lora_bias\) \(4: ", consumers="vllm"),
    "consumer-drops": Case(_extra("model.norm.weight", (64,), modules_to_save=["norm"]), "llama.cpp: model.norm.weight",
                           r"llama.cpp drops silently norm weights saved in modules_to_save \(1: model.norm.weight\)",
                           consumers="llama.cpp"),
    "consumer-misreads": Case(lambda d: save(clean_adapter(targets=("c_attn",), base=GPT2, fan_in_fan_out=True), d),
                              "llama.cpp: transformer.h.0.attn.c_attn and 1 more",
                              r"llama.cpp misreads LoRA on layers stored \(in, out\)", base=False,
                              consumers="llama.cpp"),
    "consumer-scale": Case(_configured({}, alpha_pattern={"v_proj": 4}),
                           "llama.cpp: model.layers.0.self_attn.v_proj and 1 more",
                           r"llama.cpp applies 2x PEFT's scale on 2 module\(s\): lora_alpha=8 with rank 4 "
                           r"\(alpha_pattern not read\)", consumers="llama.cpp"),
    "consumer-model-dependent": Case(_configured({}, targets=("q_proj", "embed_tokens")), "vllm: model.embed_tokens",
                                     r"vLLM may refuse LoRA on an embedding", consumers="vllm"),
    "consumer-legacy-scale": Case(_configured({}, alpha_pattern={"v_proj": 4}),
                                  "vllm: model.layers.0.self_attn.v_proj and 1 more",
                                  r"vLLM before 0.32 applies 2x PEFT's scale on 2 module\(s\): one scale for the whole "
                                  r"adapter, lora_alpha/r = 8/4", consumers="vllm"),
    "consumer-max-rank": Case(_configured({}, targets=("q_proj",), r=32), "vllm",
                              r"this adapter's largest rank is 32", consumers="vllm"),
    "gguf-metadata": Case(lambda d: gguf_file(d, general_type="model"), "general.type",
                          r"is 'model'; llama.cpp's loader refuses a LoRA file unless it is 'adapter'"),
    "gguf-architecture": Case(lambda d: gguf_file(d, arch="qwen2"), "general.architecture",
                              r"is 'qwen2' but BASE \(LlamaForCausalLM\) is 'llama' in GGUF"),
    "gguf-tensor-unexpected": Case(lambda d: gguf_file(d, extra="blk.0.attn_q.weight.lora_c"),
                                   "blk.0.attn_q.weight.lora_c", r"neither a .lora_a/.lora_b tensor nor a \*_norm"),
    "gguf-alpha": Case(lambda d: gguf_file(d, alpha=None), "adapter.lora.alpha",
                       r"is None: llama.cpp then applies scale 1 to every pair"),
    "check-skipped": Case(lambda d: save(clean_adapter(), d), "--base",
                          r"no base model was given: the targets, shapes, experts check\(s\) did not run", base=False),
}


from tests.surgery.validate.broken_moe import MOE_CASES  # noqa: E402 - its cases use the helpers above

CASES.update(MOE_CASES)


def build(code: str, directory: Path) -> tuple[Path, Optional[Path]]:
    """Write the case of ``code`` into ``directory``; returns ``(PATH, BASE or None)`` to validate."""
    case = CASES[code]
    base = case.base if isinstance(case.base, Path) else LLAMA if case.base else None
    return case.build(directory), base


def main(argv: list[str]) -> None:
    out = Path(argv[0] if argv else "broken-adapters")
    for code in CASES:
        path, base = build(code, out / code)
        consumers = CASES[code].consumers
        print(f"{code}: {path}" + (f" (base {base})" if base else "") + (f" (--for {consumers})" if consumers else ""))


if __name__ == "__main__":
    main(sys.argv[1:])
