"""Probes: scripts that measure how a consumer (PEFT) reads an adapter layout, on tiny models built with
transformers' ``from_config``. Their output is quoted in CONSUMERS-MOE.md; tests/parity holds the asserted versions."""
