"""``validate --for``: what vLLM and llama.cpp refuse, drop or scale differently from PEFT, as findings.

The consumers' rules themselves are tested in ``tests/consumers/``; here: that validate reports them with the
right codes, severities, ``where`` and modules, that adapters written ``--for`` a consumer validate clean for
it, the exit codes, the JSON, and the inputs the check cannot judge.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from lorasurg import Adapter, ConfigError, consumer_findings, extract_to_dir, validate, validate_adapter
from lorasurg.cli import main
from lorasurg.findings import CODES
from lorasurg.surgery.validate import CONSUMER_CODES, load_subject
from lorasurg.surgery.validate.consumer_checks import to_finding
from lorasurg.consumers import ConsumerFinding

from tests.surgery.validate.broken import CASES, LLAMA, ROOT, build, clean_adapter, config_only, save

QWEN2 = ROOT / "fixtures" / "tiny-qwen2" / "base"
TUNED = {"llama": ROOT / "fixtures" / "tiny-llama" / "tuned", "qwen2": ROOT / "fixtures" / "tiny-qwen2" / "tuned"}
BASES = {"llama": LLAMA, "qwen2": QWEN2}


def _run(*args):
    return CliRunner().invoke(main, ["validate", *map(str, args)])


def _extract(tmp_path: Path, arch: str, consumers: str = "peft", **options) -> Path:
    out = tmp_path / f"{arch}-{consumers}"
    extract_to_dir(BASES[arch], TUNED[arch], out, device="cpu", consumers=consumers, **options)
    return out


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """The issue's example: ``extract --rank-policy energy:0.9 --r 32`` on the tiny Llama (mixed ranks)."""
    return _extract(tmp_path_factory.mktemp("mixed"), "llama", rank_policy="energy:0.9", r=32, embeddings="lora")


def test_mixed_ranks_for_llama_cpp_is_a_scale_error_with_factor_and_count(mixed):
    """llama.cpp's scale is ``lora_alpha / r_m`` (src/llama-adapter.h, llama_adapter_lora_weight::get_scale: rank is
    ``b->ne[0]``, alpha the config's only): with lora_alpha=22 and alpha_pattern giving rank-4 modules alpha 4,
    PEFT applies 4/4 = 1 there and llama.cpp 22/4 = 5.5."""
    adapter = Adapter.load(mixed)
    cfg = adapter.config
    rank4 = sorted(n for n, m in adapter.modules.items() if m.rank == 4)
    assert (cfg.r, cfg.lora_alpha) == (22, 22) and rank4  # the fixture still gives the example
    assert all(adapter.rank_alpha(n) == (4, 4) for n in rank4)

    result = _run(mixed, "--base", LLAMA, "--for", "llama.cpp")
    assert result.exit_code == 1, result.output
    assert result.stdout.startswith(f"validate {mixed} against {LLAMA}, as read by llama.cpp")
    assert f"error    consumer-scale  llama.cpp: {rank4[0]} and {len(rank4) - 1} more" in result.stdout
    assert (f"llama.cpp applies 5.5x PEFT's scale on {len(rank4)} module(s): lora_alpha=22 with rank 4 "
            "(alpha_pattern not read)") in result.stdout
    assert "fix: write the adapter --for llama.cpp" in result.stdout
    assert re.search(r"error: \d+ error\(s\) found", result.stderr)

    (scale,) = [f for f in validate(mixed, LLAMA, "llama.cpp") if f.code == "consumer-scale"]
    assert scale.severity == "error" and sorted(scale.modules) == rank4


def test_without_for_nothing_changes(mixed):
    """Default ``--for peft``: PEFT is the reference, so no consumer check runs and nothing is reported for it."""
    assert validate(mixed, LLAMA) == [] == validate(mixed, LLAMA, "peft")
    result = _run(mixed, "--base", LLAMA, "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["consumers"] == ["peft"] and data["findings"] == []
    assert "as read by" not in _run(mixed, "--base", LLAMA).stdout


@pytest.mark.parametrize("written", ["llama.cpp", "all"])
def test_extract_written_for_a_consumer_validates_clean_for_it(tmp_path, written):
    out = _extract(tmp_path, "llama", written, rank_policy="energy:0.9", r=32)
    findings = validate(out, LLAMA, written)
    assert [(f.code, f.where, f.message) for f in findings] == []
    result = _run(out, "--base", LLAMA, "--for", written)
    assert result.exit_code == 0 and result.stdout.strip().endswith("no problems found")


def test_written_for_llama_cpp_is_not_clean_for_vllm_where_vllm_depends_on_the_model(tmp_path):
    """An adapter is right for the consumers it was written for: vLLM reads embedding/lm_head LoRA only for some
    model classes (warnings, exit 0)."""
    out = _extract(tmp_path, "llama", "llama.cpp", rank_policy="energy:0.9", r=32)
    findings = validate(out, LLAMA, "vllm")
    codes = {f.code for f in findings}
    assert "consumer-model-dependent" in codes and all(f.severity == "warning" for f in findings)
    assert _run(out, "--base", LLAMA, "--for", "vllm").exit_code == 0


def test_lora_bias_adapter_for_vllm_is_refused_and_json_lists_the_modules(tmp_path):
    """vLLM's PEFTHelper._validate_features refuses ``lora_bias: true`` (vllm/lora/peft_helper.py, vLLM 0.34.0)."""
    out = _extract(tmp_path, "qwen2", r=8)
    biased = sorted(n for n, m in Adapter.load(out).modules.items() if m.bias is not None)
    assert biased
    result = _run(out, "--base", QWEN2, "--for", "vllm", "--json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)  # nothing else on stdout
    assert data["consumers"] == ["vllm"]
    (bias,) = [f for f in data["findings"] if f["code"] == "consumer-refuses" and "lora_B.bias" in f["message"]]
    assert bias["severity"] == "error"
    assert bias["where"] == f"vllm: {biased[0]} and {len(biased) - 1} more"
    assert sorted(bias["modules"]) == biased
    assert f"vLLM refuses lora_B.bias tensors (lora_bias) ({len(biased)}: " in bias["message"]
    assert "prepare_for" in bias["fix"] and "--for vllm" in bias["fix"]
    assert data["counts"]["error"] == sum(f["severity"] == "error" for f in data["findings"])
    # the saved whole modules (embeddings) are refused too, by name
    saved = [f for f in data["findings"] if f["code"] == "consumer-refuses" and "modules_to_save" in f["message"]]
    assert saved and all(f["where"].startswith("vllm: ") for f in saved)


def test_lora_bias_adapter_for_all_reports_each_consumer(tmp_path):
    out = _extract(tmp_path, "qwen2", r=8)
    refusals = {f.where.split(":")[0] for f in validate(out, QWEN2, "all") if f.code == "consumer-refuses"}
    assert refusals == {"vllm", "llama.cpp"}
    assert validate(_extract(tmp_path, "qwen2", "all", r=8), QWEN2, "all") == []


def test_tied_head_comes_from_the_base_model(tmp_path):
    """A LoRA on Qwen2's lm_head, which is tied to the input embedding: llama.cpp refuses it (convert_lora_to_gguf.py
    LoraModel.modify_tensors; llama-adapter.cpp finds no output.weight). Only the base says that it is tied."""
    path = save(clean_adapter(targets=("lm_head",), base=QWEN2), tmp_path / "a")
    with_base = validate(path, QWEN2, "llama.cpp")
    assert [(f.code, f.where) for f in with_base] == [("consumer-refuses", "llama.cpp: lm_head")]
    assert "tied to the input embedding" in with_base[0].message
    without_base = [f for f in validate(path, None, "llama.cpp") if f.code.startswith("consumer-")]
    assert without_base == []  # its factors are not the embedding's: nothing says the head is tied


def test_bad_for_exits_2_with_the_accepted_names(tmp_path):
    path = save(clean_adapter(), tmp_path / "a")
    result = _run(path, "--for", "vllm,tgi")
    assert result.exit_code == 2 and result.stdout == ""
    assert "Invalid value for '--for': unknown consumer(s) 'tgi'" in result.stderr
    assert "choose from peft, vllm, llama.cpp or all" in result.stderr
    with pytest.raises(ConfigError, match="unknown consumer"):
        validate(path, consumers="gguf")
    with pytest.raises(ConfigError, match="choose from peft, vllm, llama.cpp or all"):
        validate_adapter(path, consumers=["vllm", "exllama"])


def test_config_alone_cannot_be_checked_for_a_consumer(tmp_path):
    path = config_only(tmp_path / "c", target_modules=["q_proj"], lora_bias=True)
    findings = validate(path, LLAMA, "vllm")
    (skip,) = [f for f in findings if f.where == "--for"]
    assert skip.code == "check-skipped" and skip.severity == "info"
    assert skip.message == "PATH is a config alone: the consumers check (vllm) did not run"
    assert not [f for f in validate(path, LLAMA) if f.where == "--for"]


def test_unreadable_weights_skip_the_consumer_check(tmp_path):
    path, _ = build("file-unreadable", tmp_path / "a")
    (skip,) = [f for f in validate(path, None, "llama.cpp") if f.where == "--for"]
    assert "could not be read" in skip.message and "(llama.cpp) did not run" in skip.message


def test_fix_does_not_rewrite_for_consumers(mixed, tmp_path):
    """--fix changes no tensor value, so a scale mismatch stays in the copy, and the copy is judged for it."""
    report = validate_adapter(mixed, LLAMA, consumers="llama.cpp", fix_output=tmp_path / "fixed")
    assert report.fix is not None and report.fix.output is not None and report.fix.changes == []
    assert "consumer-scale" in {f.code for f in report.fix.remaining}
    assert report.errors > 0
    assert report.to_dict()["consumers"] == ["llama.cpp"]
    help_text = CliRunner().invoke(main, ["validate", "--help"]).output
    assert "It is not rewritten for --for consumers" in " ".join(help_text.split())


def test_every_consumer_finding_kind_has_a_code_of_its_severity(tmp_path):
    """Each ConsumerFinding kind maps to a ``consumer-*`` code whose severity is the one the consumer rules give."""
    assert {code for code, _ in CONSUMER_CODES.values()} == {c for c in CODES if c.startswith("consumer-")}
    assert all(CODES[code].area == "consumers" for code, _ in CONSUMER_CODES.values())
    seen = set()
    for code, case in CASES.items():
        if case.consumers is None:
            continue
        path, base = build(code, tmp_path / code)
        subject = load_subject(path, base)
        for found in consumer_findings(subject.adapter, case.consumers):
            finding = to_finding(found, str(path))
            assert finding.severity == found.severity, (found.code, finding.code)
            seen.add(finding.code)
    assert seen == {code for code, _ in CONSUMER_CODES.values()}


def test_unknown_consumer_finding_code_is_a_clear_error():
    with pytest.raises(KeyError, match="'surprises:x' has no validate code; add it to CONSUMER_CODES"):
        to_finding(ConsumerFinding("vllm", "surprises:x", "error", "m", "h"))
