"""examples/tp_serve.py under torchrun with 2 gloo processes: it builds a twin from sharded
expert checkpoints on both ranks, serves a mixed batch with tensor parallelism, and agrees with
one process."""

import os
from pathlib import Path

import pytest
import torch
from _torchrun import torchrun

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch built without torch.distributed")

ROOT = Path(__file__).resolve().parents[1]


def test_tp_serve_example_agrees_with_one_process(tmp_path):
    run = torchrun([ROOT / "examples" / "tp_serve.py", "--out", tmp_path], 2)
    assert "built by 2 ranks" in run.stdout and "OK" in run.stdout.split()
    assert "generated tokens identical: True" in run.stdout
    files = os.listdir(tmp_path / "twin")
    assert "twin.safetensors.index.json" in files
    assert len([f for f in files if f.endswith("-of-00002.safetensors")]) == 2
