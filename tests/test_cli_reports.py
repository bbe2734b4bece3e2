"""What the command line says agrees with what it wrote and with the README: module counts under ``--for``, the
help of residualize's options, runnable help examples, merge's seed, and option names in messages."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from safetensors import safe_open

from lorasurg.cli import main
from tests.clitools import LLAMA, LLAMA_TUNED, ROOT, refused, run


def _written_modules(directory) -> set[str]:
    with safe_open(str(directory / "adapter_model.safetensors"), "pt") as f:
        return {k.removeprefix("base_model.model.").split(".lora_")[0] for k in f.keys() if ".lora_" in k}


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """Two adapters on the tiny Llama (r=4, r=2) that LoRA the embedding and lm_head too."""
    root = tmp_path_factory.mktemp("extracted")
    for r in (4, 2):
        assert run("extract", LLAMA, LLAMA_TUNED, "--r", r, "-o", root / f"r{r}").exit_code == 0
    return root


@pytest.mark.parametrize("argv", [
    ["merge", "{r4}", "{r2}", "--method", "cat", "--for", "all"],
    ["rerank", "{r4}", "--r", "2", "--for", "vllm"],
])
def test_the_footer_counts_the_modules_written(extracted, tmp_path, argv):
    out = tmp_path / "out"
    argv = [a.format(r4=extracted / "r4", r2=extracted / "r2") for a in argv]
    text = run(*argv, "-o", out)
    assert text.exit_code == 0, text.output
    written = _written_modules(out)
    assert len(written) == 14  # of 16: the --for rules leave out the embedding and lm_head LoRA
    assert f"{len(written)} modules (2 more left out for the --for consumers)" in text.stdout
    rows = [line for line in text.stdout.splitlines() if line.startswith(("lm_head", "model.embed_tokens"))]
    assert len(rows) == 2 and all("(left out)" in row for row in rows)
    report = json.loads(run(*argv, "--json", "-o", tmp_path / "json").stdout)
    assert report["totals"]["modules"] == len(written)


def _help(command: str) -> str:
    return " ".join(run(command, "--help").stdout.split())


def test_residualize_help_says_what_the_readme_says():
    text = _help("residualize")
    assert "a target whose working set does not fit is refused before anything is written" in text
    assert "streamed from disk" not in text
    assert "refused before any work, naming the modules to --exclude-modules" in text
    assert "left out and listed" not in text


def _examples(text: str) -> list[list[str]]:
    """The ``lorasurg ...`` lines of a text (continuation lines joined), split as a shell would."""
    return [shlex.split(line.strip())[1:] for line in text.replace("\\\n", " ").splitlines()
            if line.strip().startswith("lorasurg ")]


def test_help_examples_read_only_fixtures_and_outputs_an_example_writes():
    """A path a --help example reads is a fixture, or an output (``-o``) that an example of the README or of a
    --help page writes."""
    helps = {name: run(name, "--help").stdout for name in main.commands}
    examples = _examples((ROOT / "README.md").read_text()) + [e for text in helps.values() for e in _examples(text)]
    written = {Path(argv[i + 1]).parts[:2] for argv in examples for i, word in enumerate(argv[:-1]) if word == "-o"}
    for name, text in helps.items():
        for argv in _examples(text):
            inputs = [w for i, w in enumerate(argv) if i == 0 or argv[i - 1] not in ("-o", "--plot")]
            for word in inputs:
                if word.startswith("fixtures/"):
                    assert (ROOT / word).exists(), (name, word)
                elif word.startswith("out/"):
                    assert Path(word).parts[:2] in written, (name, word)


def test_merge_seed_is_null_where_the_method_draws_nothing(extracted, tmp_path):
    assert "the other methods draw nothing, and their report's seed is null" in _help("merge")
    svd = json.loads(run("merge", extracted / "r4", extracted / "r2", "--json", "-o", tmp_path / "svd").stdout)
    dare = json.loads(run("merge", extracted / "r4", extracted / "r4", "--method", "dare_linear", "--density",
                          "0.5", "--json", "-o", tmp_path / "dare").stdout)
    assert svd["settings"]["seed"] is None and dare["settings"]["seed"] == 0


def test_messages_name_flags_not_library_arguments(extracted, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    message = refused(run("rerank", extracted / "r4", "--r", "2", "-o", tmp_path / "full"), "pass --force to")
    assert "force=True" not in message
    message = refused(run("extract", LLAMA, LLAMA, "--r", "2", "-o", tmp_path / "same"), "Pass --allow-empty to")
    assert "allow_empty" not in message
