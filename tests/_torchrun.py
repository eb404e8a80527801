"""Launching tests' ranks: torchrun (gloo, one thread per rank), with this checkout's
twinmerge_ext first on the path whatever an installed copy says."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(args, world: int, timeout: int = 600) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node world *args`; asserts it succeeded."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")]
                                                    if p]))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          f"--nproc-per-node={world}", *map(str, args)], capture_output=True,
                         text=True, timeout=timeout, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return run


def run_ranks(worker: str, case: str, world: int, out) -> list:
    """Runs `worker case out` on `world` ranks; each rank's OUT/rank{r}.json, in rank order."""
    torchrun([worker, case, out], world)
    return [json.load(open(os.path.join(out, f"rank{i}.json"))) for i in range(world)]
