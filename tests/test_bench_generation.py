"""bench/generation.py at tiny sizes: every case runs, is checked against the plain model
before it is timed, and returns a well-formed row. Timing values are never asserted on."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
pytest.importorskip("transformers")
from bench import generation  # noqa: E402

TINY = dict(vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=48)


def test_every_case_returns_its_ratios_and_rates():
    rows = generation.run(layers=1, T=3, rank=2, B=4, L=5, new=3, rounds=1, runs=1, **TINY)
    by_case = {r["case"]: r for r in rows}
    assert list(by_case) == ["prefill", "decode", "router", "generate", "serve_loop"]
    assert set(by_case["decode"]["ratios"]) == {"factored", "materialize"}
    assert by_case["decode"]["baseline"] == "plain"
    assert set(by_case["generate"]["tokens_per_s"]) == {"factored", "plain"}
    for row in rows:
        assert all(v > 0 for v in row["ratios"].values())
        assert row["shape"]["T"] == 3 and row["shape"]["B"] == 4
    json.dumps(rows)  # the results file is JSON


def test_the_case_is_a_llama_with_lora_like_experts():
    make, twin = generation.llama_case(layers=1, T=3, rank=2, **TINY)
    assert type(make()).__name__ == "LlamaForCausalLM"
    assert twin.tasks == ["task0", "task1", "task2"]
    assert all(lr.ranks == (2,) * 3 for lr in twin.lowrank.values())
    assert all(name.endswith("proj.weight") for name in twin.lowrank)
