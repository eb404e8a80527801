"""The README's example runs as written, and its factored output is exact per row."""

import re
from pathlib import Path

import torch

from twinmerge_ext import reference as ref

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(i):
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[i]


def test_readme_example_runs_and_is_exact():
    code = _block(0)
    scope = {}
    exec(compile(code, str(README), "exec"), scope)
    W, y = scope["W"], scope["y"]
    args = [scope[k] for k in ("W_shared", "U_cat", "S_cat", "V_cat", "ranks")]
    torch.testing.assert_close(W, ref.lowrank_merge(*args, scope["w"]), rtol=1e-5, atol=1e-5)
    for b in (0, 17):
        W_b = ref.lowrank_merge(*args, scope["row_weights"][b])
        torch.testing.assert_close(y[b], scope["x"][b] @ W_b.T, rtol=1e-4, atol=1e-4)


def test_readme_serving_example_runs_and_every_row_is_exact(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it saves twin.safetensors in the working directory
    scope = {}
    exec(compile(_block(1), str(README), "exec"), scope)
    served, twin, config = scope["served"], scope["twin"], scope["config"]
    assert (tmp_path / "twin.safetensors").is_file()
    assert scope["report"]["val_accuracy"] >= 0.95   # the toy tasks are separable
    weights = served.last_call["weights"]
    truth = torch.arange(3).repeat_interleave(4)
    assert (weights.argmax(-1) == truth).float().mean() >= 0.9
    transformers = scope["transformers"]
    for b in (0, 5, 11):
        m = transformers.BertForSequenceClassification(config).eval()
        m.load_state_dict(twin.merged_state_dict(weights[b]))
        with torch.no_grad():
            want = m(input_ids=scope["ids"][b:b + 1]).logits
        torch.testing.assert_close(scope["logits"][b:b + 1], want, rtol=1e-4, atol=1e-5)


def test_readme_text_routing_example_runs_and_routes_every_row(tmp_path, monkeypatch):
    from twinmerge_ext import TextRouter, TwinCheckpoint

    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    scope = {}
    exec(compile(_block(1), str(README), "exec"), scope)
    exec(compile(next(b for b in blocks if "fit_text_router" in b), str(README), "exec"), scope)
    served = scope["served"]
    assert isinstance(served.router, TextRouter) and scope["text_report"]["val_accuracy"] == 1.0
    truth = torch.arange(3).repeat_interleave(4)
    assert torch.equal(served.last_call["weights"].argmax(-1), truth)
    loaded = TwinCheckpoint.load(tmp_path / "twin-text.safetensors")
    assert isinstance(loaded.router, TextRouter)
    assert torch.equal(loaded.router(scope["requests"]), served.router(scope["requests"]))
