"""The README's main-job command (examples/quickstart.py) runs and shows what it claims."""

import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"


def test_quickstart_runs_and_twin_merging_beats_task_arithmetic():
    run = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    normalized = {line[:38].strip(): float(line.split()[-1])
                  for line in run.stdout.splitlines() if re.match(r"^(expert|base|task|Twin)", line)}
    twin = [v for k, v in normalized.items() if k.startswith("Twin-Merging")]
    ta = next(v for k, v in normalized.items() if k.startswith("task arithmetic"))
    assert normalized["expert on its own task"] == 100.0
    assert len(twin) == 2 and twin[0] == twin[1], normalized  # factored == materialized
    assert min(twin) >= 95.0 and ta < 80.0, normalized
    diff = float(re.search(r"max \|diff\| = (\S+)", run.stdout).group(1))
    assert diff < 1e-4
