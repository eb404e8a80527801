"""examples/tp_serve.py under torchrun with 2 gloo processes: it builds a twin from sharded
expert checkpoints on both ranks, serves a mixed batch with tensor parallelism, and agrees with
one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch built without torch.distributed")

ROOT = Path(__file__).resolve().parents[1]


def test_tp_serve_example_agrees_with_one_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get(
                   "PYTHONPATH")] if p]))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node=2", str(ROOT / "examples" / "tp_serve.py"),
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
                         env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    assert "built by 2 ranks" in run.stdout and "OK" in run.stdout.split()
    assert "generated tokens identical: True" in run.stdout
    files = os.listdir(tmp_path / "twin")
    assert "twin.safetensors.index.json" in files
    assert len([f for f in files if f.endswith("-of-00002.safetensors")]) == 2
