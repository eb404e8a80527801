"""Writes the AOTInductor package and the reference tensors that tests/cpp/aoti_serve.cpp checks.

    python tests/cpp/make_aoti_package.py --out DIR

DIR/twin_gpt2.pt2: a tiny GPT-2 (from its config) served as the twin of 3 synthetic experts,
exported with twinmerge_ext.export (factored mode, inputs input_ids [B, L], attention_mask [B, L],
mix_weights [B, T]; B and L dynamic) and compiled for CPU. DIR/twin_gpt2_ref.pt: torch.save of
{case: tensor} with two mixed batches of another size than the export's example ("a_*": B=4,
L=9; "b_*": B=2, L=5; each row its own weights, one row padded) and the eager wrapper's logits
for each ("*_logits"), readable in C++ with torch::pickle_load. tests/test_export.py builds the
same model from this file's functions.
"""

import argparse
import copy
import os
import time

import torch
import torch.nn.functional as F

import twinmerge_ext as tm
from twinmerge_ext.export import compile_twin, export_twin

VOCAB, POSITIONS, T = 128, 64, 3
EXPORT_B, EXPORT_L = 3, 8  # the example export traces with


def tiny_gpt2():
    import transformers

    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                  n_positions=POSITIONS, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def twin_case(seed: int = 0):
    """(wrapped GPT-2 in factored mode, twin): experts = the base with perturbations of every
    parameter (full fine-tunes, stand-ins), compressed at 1/4 rank."""
    torch.manual_seed(seed)
    base = tiny_gpt2()
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    experts = {}
    for t in range(T):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():  # through parameters(): wte and lm_head stay tied
                p.add_(0.05 * torch.randn_like(p))
        experts[f"task{t}"] = {k: v.clone() for k, v in m.state_dict().items()}
    twin = tm.TwinCheckpoint.build(base_sd, experts, rank_ratio=0.25)
    return tm.TwinMergedModule(tiny_gpt2(), twin, mode="factored"), twin


def batch(B: int, L: int, seed: int):
    """input_ids [B, L], attention_mask [B, L] (row 1 right-padded), mix_weights [B, T]: row 0
    one expert alone, the others softmax mixes, every row different."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    if B > 1:
        mask[1, L - 2:] = 0
    w = torch.softmax(3 * torch.randn(B, T, generator=g), -1)
    w[0] = F.one_hot(torch.tensor(B % T), T).float()
    return ids, mask, w


def logits(wrapped, ids, mask, w):
    with torch.no_grad():
        return wrapped(input_ids=ids, attention_mask=mask, mix_weights=w, use_cache=False).logits


def export_case(wrapped, **kw):
    ids, mask, w = batch(EXPORT_B, EXPORT_L, seed=0)
    return export_twin(wrapped, {"input_ids": ids, "attention_mask": mask}, w,
                       module_kwargs={"use_cache": False}, max_length=POSITIONS, **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for twin_gpt2.pt2 and its reference")
    out = ap.parse_args().out
    os.makedirs(out, exist_ok=True)
    wrapped, _ = twin_case()
    t0 = time.perf_counter()
    program = export_case(wrapped)
    t1 = time.perf_counter()
    package = compile_twin(program, os.path.join(out, "twin_gpt2.pt2"))
    t2 = time.perf_counter()
    ref = {}
    for case, (B, L, seed) in {"a": (4, 9, 1), "b": (2, 5, 2)}.items():
        ids, mask, w = batch(B, L, seed)
        ref.update({f"{case}_input_ids": ids, f"{case}_attention_mask": mask,
                    f"{case}_mix_weights": w, f"{case}_logits": logits(wrapped, ids, mask, w)})
    torch.save(ref, os.path.join(out, "twin_gpt2_ref.pt"))
    print(f"make_aoti_package: export {t1 - t0:.1f}s, AOTInductor compile {t2 - t1:.1f}s, "
          f"{package} {os.path.getsize(package) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
