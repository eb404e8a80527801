"""The README's example runs as written, and its factored output is exact per row."""

import re
from pathlib import Path

import torch

from twinmerge_ext import reference as ref

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_is_exact():
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    scope = {}
    exec(compile(code, str(README), "exec"), scope)
    W, y = scope["W"], scope["y"]
    args = [scope[k] for k in ("W_shared", "U_cat", "S_cat", "V_cat", "ranks")]
    torch.testing.assert_close(W, ref.lowrank_merge(*args, scope["w"]), rtol=1e-5, atol=1e-5)
    for b in (0, 17):
        W_b = ref.lowrank_merge(*args, scope["row_weights"][b])
        torch.testing.assert_close(y[b], scope["x"][b] @ W_b.T, rtol=1e-4, atol=1e-4)
