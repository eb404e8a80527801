"""subspace_energies: each task's share of the input's energy in its delta's subspace, from the
twin's own factors, in one plain pass of θs."""

import threading

import pytest
import torch
from torch import nn

from twinmerge_ext import TwinCheckpoint, TwinMergedModule, router_from_config
from twinmerge_ext.energy import (EnergyRouter, energy_layers, fit_energy_router,
                                  subspace_energies)

D, T = 8, 3


class Tiny(nn.Module):
    """One-hot token embeddings into a Linear: token t's input is e_t."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(D, D)
        self.lin = nn.Linear(D, D)
        with torch.no_grad():
            self.emb.weight.copy_(torch.eye(D))
            self.lin.weight.copy_(torch.randn(D, D, generator=torch.Generator().manual_seed(0)))

    def forward(self, input_ids, attention_mask=None):
        return self.lin(self.emb(input_ids))


def _served():
    """Expert t adds (t + 1)·u_t e_tᵀ to lin.weight: its delta reads input direction e_t only."""
    base = Tiny().state_dict()
    experts = {}
    for t in range(T):
        sd = {k: v.clone() for k, v in base.items()}
        sd["lin.weight"][:, t] += (t + 1) * torch.eye(D)[(t + 3) % D]
        experts[f"task{t}"] = sd
    # θs = the base (task arithmetic at scale 0): each exclusive delta is exactly its own.
    twin = TwinCheckpoint.build(base, experts, rank=1, shared_kwargs={"scale": 0.0})
    return TwinMergedModule(Tiny(), twin, mode="factored").eval(), twin


def test_each_token_excites_its_experts_subspace():
    served, twin = _served()
    assert energy_layers(served) == ["lin"]
    ids = torch.tensor([[0, 0], [1, 1], [2, 2], [5, 5]])
    f, names = subspace_energies(served, {"input_ids": ids})
    assert names == ["lin"] and f.shape == (4, T)
    assert f[:3].argmax(-1).tolist() == [0, 1, 2]
    # The share of expert t's delta that e_t excites: its whole delta, log 1 = 0, for the
    # expert whose direction it is; the others see (almost) nothing.
    torch.testing.assert_close(f[:3].diagonal(), torch.zeros(3), atol=1e-4, rtol=0)
    assert (f[3] < -20).all()  # token 5 lies in no expert's subspace


def test_raw_energies_are_the_deltas_output_norms_pooled_over_real_tokens():
    served, twin = _served()
    ids = torch.tensor([[0, 1], [2, 2]])
    mask = torch.tensor([[1, 0], [1, 1]])
    f, _ = subspace_energies(served, {"input_ids": ids}, mask=mask, normalize=False)
    x = torch.eye(D)[ids]                                    # the Linear's inputs
    want = torch.zeros(2, T)
    for t in range(T):
        delta = twin.lowrank["lin.weight"].delta(t)          # [out, in]
        e = (x @ delta.T).pow(2).sum(-1)                     # ‖Δ_t x‖² per token
        want[:, t] = (e * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(f, want, rtol=1e-5, atol=1e-6)


def test_a_threads_energies_are_its_own_and_serving_is_untouched():
    served, twin = _served()
    ids = [torch.full((1, 2), t) for t in range(T)]
    want = [subspace_energies(served, {"input_ids": i})[0] for i in ids]
    w = torch.softmax(torch.randn(1, T), -1)
    with torch.no_grad():
        served_out = served(ids[0], mix_weights=w)
    got, outs = [None] * T, [None] * T
    start = threading.Barrier(T)

    def work(t):
        start.wait()
        for _ in range(20):
            got[t] = subspace_energies(served, {"input_ids": ids[t]})[0]
            with torch.no_grad():
                outs[t] = served(ids[0], mix_weights=w)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(T)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for t in range(T):
        assert torch.equal(got[t], want[t]) and torch.equal(outs[t], served_out)
    assert served._ctx.energy is None


def test_bad_calls_are_refused():
    served, _ = _served()
    ids = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(TypeError, match=r"subspace_energies: served must be a TwinMergedModule"):
        subspace_energies(Tiny(), {"input_ids": ids})
    with pytest.raises(TypeError, match=r"inputs must be a non-empty mapping"):
        subspace_energies(served, ids)
    with pytest.raises(ValueError, match=r"layers must be names of low-rank Linear layers of "
                                         r"the twin, not row-parallel \(energy_layers\(served\): \['lin'\]\), "
                                         r"got \['emb'\]"):
        subspace_energies(served, {"input_ids": ids}, layers=["emb"])
    with pytest.raises(ValueError, match=r"mask must be a \[B, L\] tensor, got \[2\]"):
        subspace_energies(served, {"input_ids": ids}, mask=torch.ones(2))
    served.train()
    with pytest.raises(ValueError, match=r"the module is in training mode .* call "
                                         r"served.eval\(\) first"):
        subspace_energies(served, {"input_ids": ids})


def test_gpt2_conv1d_energies_match_the_deltas_on_the_layers_inputs():
    from test_module import _experts, _gpt2
    _, base, experts = _experts(lambda *_: _gpt2(), T, 4)
    twin = TwinCheckpoint.build(base, experts, rank_ratio=0.5)
    served = TwinMergedModule(_gpt2(), twin).eval()
    name = "transformer.h.1.attn.c_attn"
    assert name in energy_layers(served)
    ids = torch.randint(1, 61, (2, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    f, names = subspace_energies(served, {"input_ids": ids, "attention_mask": mask},
                                 layers=[name], normalize=False)
    plain = _gpt2()
    plain.load_state_dict(twin.merged_state_dict(torch.zeros(T)))  # θs
    seen = {}
    plain.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    with torch.no_grad():
        plain(input_ids=ids, attention_mask=mask)
    want = torch.stack([((seen["x"] @ twin.lowrank[name + ".weight"].delta(t)) ** 2).sum(-1)
                        for t in range(T)], -1)                 # Conv1D: y = x W, W [in, out]
    m = mask.unsqueeze(-1).float()
    torch.testing.assert_close(f, (want * m).sum(1) / m.sum(1), rtol=1e-4, atol=1e-6)


def _task_batches(seed=0, n=4):
    """Task t: sequences of token t with some tokens 5..7 (in no expert's subspace) mixed in."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t in range(T):
        batches = []
        for _ in range(n):
            ids = torch.where(torch.rand(4, 6, generator=g) < 0.3,
                              torch.randint(5, 8, (4, 6), generator=g), torch.full((4, 6), t))
            batches.append({"input_ids": ids, "attention_mask": torch.ones(4, 6,
                                                                            dtype=torch.long)})
        out[f"task{t}"] = batches
    return out


def test_the_energy_router_routes_without_training_and_travels_with_the_twin(tmp_path):
    served, twin = _served()
    data = _task_batches()
    router, report = fit_energy_router(served, data)
    assert isinstance(router, EnergyRouter) and router.energy_layers == ["lin"]
    assert report["val_accuracy_uncalibrated"] == 1.0 and not report["calibrated"]
    assert float(router.scale) == 1.0 and router.bias.abs().sum() == 0
    path = tmp_path / "twin.safetensors"
    twin.with_router(router, info=report).save(path)
    loaded = TwinCheckpoint.load(path)
    assert isinstance(loaded.router, EnergyRouter) and loaded.router.energy_layers == ["lin"]
    wrapped = TwinMergedModule(Tiny(), loaded, mode="factored").eval()
    ids = torch.tensor([[2, 2, 6], [0, 7, 0], [1, 1, 1]])
    w = wrapped.route(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert w.argmax(-1).tolist() == [2, 0, 1]
    with torch.no_grad():  # a call without weights routes by energies, then mixes
        out = wrapped(ids, attention_mask=torch.ones_like(ids))
    assert wrapped.last_call["weights"].argmax(-1).tolist() == [2, 0, 1]
    assert out.shape == (3, 3, D)


def test_calibration_is_kept_only_when_it_helps_on_validation():
    served, _ = _served()
    router = EnergyRouter(served.tasks, ["lin"])
    f, _ = subspace_energies(served, {"input_ids": torch.tensor([[0, 0], [1, 1]])})
    torch.testing.assert_close(router(f), f)  # one layer: the logits are the energies
    # Tokens 5..7 only: no expert's subspace is excited, so only the biases can tell the tasks
    # apart (they cannot), and calibration must not claim a gain it does not have.
    g = torch.Generator().manual_seed(1)
    data = {f"task{t}": [{"input_ids": torch.randint(5, 8, (4, 6), generator=g)}
                         for _ in range(4)] for t in range(T)}
    router, report = fit_energy_router(served, data)
    assert report["val_accuracy"] <= 0.5
    assert report["calibrated"] == (report["val_accuracy_calibrated"] >
                                    report["val_accuracy_uncalibrated"])


def test_bad_energy_routers_are_refused():
    served, _ = _served()
    with pytest.raises(ValueError, match=r"EnergyRouter: energy_layers must be a non-empty list "
                                         r"of layer names, got 'lin'"):
        EnergyRouter(served.tasks, "lin")
    with pytest.raises(ValueError, match=r"EnergyRouter.from_config: cfg must have exactly the "
                                         r"keys \['kind', 'tasks', 'energy_layers'\]"):
        router_from_config({"kind": "energy", "tasks": ["a"]})
    with pytest.raises(ValueError, match=r"fit_energy_router: data must hold the twin's tasks "
                                         r"in order"):
        fit_energy_router(served, {"x": [], "y": []})
    with pytest.raises(ValueError, match=r"EnergyRouter.forward: features must have shape "
                                         r"\[B, 3\], got \[2, 4\]"):
        EnergyRouter(served.tasks, ["lin"])(torch.ones(2, 4))
    router = EnergyRouter(served.tasks, ["lin"])
    assert isinstance(router_from_config(router.config(), router.state_dict()), EnergyRouter)
