"""bench/checkpoint_io.py at tiny sizes: every rate and time is there, the synthetic twin is a
valid twin of RoBERTa's layout. Timing values are never asserted on."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import checkpoint_io  # noqa: E402
from twinmerge_ext import TwinCheckpoint  # noqa: E402


def test_hash_rates_cover_every_candidate():
    rates = checkpoint_io.hash_rates(nbytes=1 << 16, min_run_time=0.0)
    assert sorted(rates) == sorted([*checkpoint_io.HASHES, "sha256_2_threads",
                                    "non_finite_check", "isfinite_all"])
    assert all(r > 0 for r in rates.values())


def test_the_synthetic_twin_and_its_load_times(tmp_path):
    shape = dict(h=8, f=16, L=2, vocab=30)
    twin = checkpoint_io.roberta_twin(3, **shape)
    assert len(twin.shared) == 5 + 16 * 2 + 2           # embeddings, 2 layers, pooler
    assert twin.report()["unchanged"] == ["embeddings.word_embeddings.weight"]
    assert len(twin.lowrank) == 2 + 6 * 2 + 1            # every other matrix
    assert all(lr.ranks == (1,) * 3 for lr in twin.lowrank.values())
    twin.save(tmp_path / "t.safetensors")
    assert TwinCheckpoint.load(tmp_path / "t.safetensors").metadata == twin.metadata
    out = checkpoint_io.load_times(3, **shape)
    assert out["file_bytes"] == os.path.getsize(tmp_path / "t.safetensors")
    for key in ("save_ms", "load_verify_warm_ms", "load_verify_cold_ms", "load_no_verify_warm_ms",
                "load_no_verify_cold_ms", "safetensors_load_file_warm_ms",
                "safetensors_load_file_cold_ms", "evict_only_ms"):
        assert out[key] > 0, key
