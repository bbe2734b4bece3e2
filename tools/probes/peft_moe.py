"""How PEFT (as installed: 0.21.2 on transformers 5) reads per-expert MoE LoRA written under checkpoint names.

    python -m tools.probes.peft_moe [qwen3_moe mixtral qwen2_moe deepseek_v3]
    python -m tools.probes.peft_moe saved     # what PEFT saves for target_parameters on fused experts

For each tiny model (2 layers, 4 experts, hidden 32, expert intermediate 12; DeepSeek-V3: layer 0 dense, layer 1 MoE
with a shared expert) and each case, one line: PEFT raises (and what), or the largest |PEFT - dense| over the
logits, where "dense" is the checkpoint with W += (alpha_m / r_m) B @ A on every adapted matrix (from_pretrained),
next to |dense - base| (how much the adapter moves the outputs), the config PEFT converted to, and its
missing-keys warnings. Cases: every expert and projection at one rank (full), one expert missing, one expert at
another rank, down_proj at another rank (anchored keys / a `down_proj` key), per-expert alpha_pattern, rsLoRA (and
against a fine-tune with sqrt(2) x the rsLoRA scale on gate and up: what PEFT computes),
gate/up without down, gate alone, lora_dropout/use_dora/lora_bias, the router, shared experts, a dense MLP layer,
and the config pre-converted to target_parameters.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import warnings

import torch
from safetensors.torch import load_file, save_file

H, I, E, V, R, ALPHA = 32, 12, 4, 64, 4, 8
CASES = ("full", "missing-expert", "expert-rank", "layer-rank", "proj-rank", "proj-rank-suffix", "expert-alpha",
         "rslora", "rslora-sqrt2", "gate-up-only", "gate-only", "dropout", "dora", "lora-bias", "router", "shared", "dense",
         "preconverted")


def config(kind):
    from transformers import AutoConfig

    common = dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=V,
                  max_position_embeddings=64)
    moe = dict(moe_intermediate_size=I, num_experts_per_tok=2)
    if kind == "qwen3_moe":
        return AutoConfig.for_model(kind, intermediate_size=I, num_experts=E, head_dim=8, mlp_only_layers=[], **moe,
                                    **common)
    if kind == "mixtral":
        return AutoConfig.for_model(kind, intermediate_size=I, num_local_experts=E, num_experts_per_tok=2, head_dim=8,
                                    **common)
    if kind == "qwen2_moe":
        return AutoConfig.for_model(kind, intermediate_size=I, num_experts=E, shared_expert_intermediate_size=I,
                                    mlp_only_layers=[], **moe, **common)
    return AutoConfig.for_model(kind, intermediate_size=I, n_routed_experts=E, n_shared_experts=1,
                                first_k_dense_replace=1, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=None,
                                qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, **moe,
                                **{**common, "num_key_value_heads": 4})


def base_checkpoint(kind):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config(kind))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)  # every expert routed to
    directory = tempfile.mkdtemp(prefix=f"{kind}-")
    model.save_pretrained(directory)
    return directory


def adapter(kind, base, case):
    """(adapter dir, tuned checkpoint dir, number of LoRA modules) for ``case``."""
    sd = load_file(f"{base}/model.safetensors")
    g, u, dn = ("w1", "w3", "w2") if kind == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    torch.manual_seed(1)
    tensors, ranks, alphas, targets, tuned = {}, {}, {}, set(), dict(sd)
    for key in sorted(sd):
        m = re.match(r"(.*\.experts\.(\d+)\.(\w+))\.weight$", key)
        if m is None:
            wanted = {"router": r"\.gate\.weight$", "shared": r"\.shared_experts?\.\w+_proj\.weight$",
                      "dense": r"layers\.\d+\.mlp\.\w+_proj\.weight$"}.get(case)
            if wanted is None or not re.search(wanted, key):
                continue
            module, e, proj = key[: -len(".weight")], -1, key.split(".")[-2]
        else:
            module, e, proj = m.group(1), int(m.group(2)), m.group(3)
            if (case == "missing-expert" and e == 3 and ".layers.1." in key) or \
                    (case == "gate-up-only" and proj == dn) or (case == "gate-only" and proj != g):
                continue
        r = 2 if ((case == "expert-rank" and e == 0) or (case == "layer-rank" and ".layers.0." in key and e >= 0)
                  or (case in ("proj-rank", "proj-rank-suffix") and proj == dn)) else R
        if r != R:
            ranks[dn if case == "proj-rank-suffix" else "^" + re.escape(module)] = r
        alpha = ALPHA
        if case == "expert-alpha" and e == 1:
            alpha = alphas["^" + re.escape(module)] = 2 * ALPHA
        scale = alpha / r ** 0.5 if case.startswith("rslora") else alpha / r
        if case == "rslora-sqrt2" and proj in (g, u):  # the fine-tune PEFT computes: gate/up at sqrt(2) x scale
            scale *= 2 ** 0.5
        out, inp = sd[key].shape
        A, B = torch.randn(r, inp) * 0.3, torch.randn(out, r) * 0.3
        tensors[f"base_model.model.{module}.lora_A.weight"] = A.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = B.contiguous()
        tuned[key] = sd[key] + scale * B @ A
        targets.add(proj)
    cfg = dict(peft_type="LORA", task_type="CAUSAL_LM", r=R, lora_alpha=ALPHA, target_modules=sorted(targets),
               rank_pattern=ranks, alpha_pattern=alphas, use_rslora=case.startswith("rslora"),
               lora_dropout=0.05 if case == "dropout" else 0.0, use_dora=case == "dora", lora_bias=case == "lora-bias")
    if case == "preconverted":  # PEFT's own converted form, written up front
        cfg.update(target_modules=[], target_parameters=["gate_up_proj", "down_proj"],
                   rank_pattern={r".*\.gate_up_proj": 2 * R}, alpha_pattern={r".*\.gate_up_proj": 2 * ALPHA})
    ad, td = tempfile.mkdtemp(prefix=f"{kind}-{case}-"), tempfile.mkdtemp(prefix=f"{kind}-{case}-tuned-")
    save_file(tensors, f"{ad}/adapter_model.safetensors")
    json.dump(cfg, open(f"{ad}/adapter_config.json", "w"))
    save_file({k: v.contiguous() for k, v in tuned.items()}, f"{td}/model.safetensors", metadata={"format": "pt"})
    open(f"{td}/config.json", "w").write(open(f"{base}/config.json").read())
    return ad, td, len(tensors) // 2


def run(kind, base, case):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ad, td, n = adapter(kind, base, case)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
    with torch.no_grad():
        y_dense = AutoModelForCausalLM.from_pretrained(td).eval()(ids).logits
        model = AutoModelForCausalLM.from_pretrained(base).eval()
        y_base = model(ids).logits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            pm = PeftModel.from_pretrained(model, ad).eval()
        except Exception as err:  # noqa: BLE001 - the probe reports what PEFT raises
            return f"{kind:12s} {case:17s} {n:3d} modules: PEFT raises {type(err).__name__}: " \
                   f"{str(err).splitlines()[0][:150]}"
    missing = [str(w.message)[:90] for w in caught if "missing adapter keys" in str(w.message)]
    cfg = pm.peft_config["default"]
    with torch.no_grad():
        diff = (pm(ids).logits - y_dense).abs().max().item()
    return (f"{kind:12s} {case:17s} {n:3d} modules: |peft-dense|={diff:.1e} (|dense-base|="
            f"{(y_dense - y_base).abs().max().item():.1e}); target_parameters="
            f"{sorted(cfg.target_parameters) if cfg.target_parameters else None}, target_modules="
            f"{sorted(cfg.target_modules) if cfg.target_modules else None}; missing keys: {bool(missing)}")


def saved():
    """The keys and shapes PEFT saves for LoRA on fused experts (Qwen3-MoE, and gpt-oss whose checkpoints are fused),
    with target_parameters given either way round, one parameter alone, and target_modules=[gate_proj, up_proj,
    down_proj] on the transformers-5 model (converted by PEFT itself)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    gpt_oss = AutoConfig.for_model("gpt_oss", hidden_size=H, intermediate_size=I, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=V,
                                   num_local_experts=E, num_experts_per_tok=2, layer_types=["full_attention"] * 2)
    runs = [("qwen3_moe", dict(target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])),
            ("qwen3_moe", dict(target_parameters=["mlp.experts.down_proj", "mlp.experts.gate_up_proj"])),
            ("qwen3_moe", dict(target_parameters=["mlp.experts.gate_up_proj"])),
            ("qwen3_moe", dict(target_modules=["gate_proj", "up_proj", "down_proj"])),
            ("gpt_oss", dict(target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))]
    for kind, kw in runs:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(gpt_oss if kind == "gpt_oss" else config(kind))
        pm = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, init_lora_weights=False, **kw))
        directory = tempfile.mkdtemp()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm.save_pretrained(directory)
        cfg = json.load(open(f"{directory}/adapter_config.json"))
        state = load_file(f"{directory}/adapter_model.safetensors")
        print(f"{kind} {kw}: saved target_parameters={cfg.get('target_parameters')} rank_pattern={cfg['rank_pattern']}")
        for k in sorted(k for k in state if ".layers.0.mlp" in k):
            print(f"    {k} {tuple(state[k].shape)}")
    params = dict(AutoModelForCausalLM.from_config(gpt_oss).named_parameters())
    print("gpt_oss experts:", {k.split("experts.")[1]: tuple(v.shape) for k, v in params.items()
                               if ".layers.0.mlp.experts." in k})


def main(argv):
    if argv[:1] == ["saved"]:
        return saved()
    kinds = argv or ["qwen3_moe", "mixtral", "qwen2_moe", "deepseek_v3"]
    for kind in kinds:
        base = base_checkpoint(kind)
        for case in CASES:
            if (case == "shared" and kind not in ("qwen2_moe", "deepseek_v3")) or (case == "dense"
                                                                                  and kind != "deepseek_v3"):
                continue
            print(run(kind, base, case), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
