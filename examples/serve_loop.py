"""Continuous batching with Twin-Merging: requests join and leave a running batch between decode
steps, each served by its own merged model θs + Σt w_t·v̂t, in one forward per step.

The model is a small GPT-2 built from a config, and its three "experts" are random perturbations
of it (no download): the point here is the serving loop, not what the experts know. Each request
arrives at a step of its own, with its own mixing weights and length; every step prints which
requests are in the batch. At the end each request's tokens are checked against the same request
served alone by `served.generate`.

    python examples/serve_loop.py
"""

import torch
import transformers

from twinmerge_ext import ServeLoop, TwinCheckpoint, TwinMergedModule

VOCAB, TASKS = 96, ["qa", "translate", "summarize"]


def tiny_gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4,
                                     n_positions=64, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def main():
    torch.manual_seed(0)
    base = tiny_gpt2().state_dict()
    experts = {t: {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
                   for k, v in base.items()} for t in TASKS}
    twin = TwinCheckpoint.build(base, experts, rank_ratio=0.5)
    served = TwinMergedModule(tiny_gpt2(), twin, mode="factored")

    g = torch.Generator().manual_seed(1)
    # (arrival step, prompt length, new tokens, weights over the tasks)
    arrivals = [(0, 5, 8, [1.0, 0.0, 0.0]), (0, 3, 12, [0.0, 1.0, 0.0]),
                (2, 7, 6, [0.2, 0.3, 0.5]), (4, 4, 10, [0.0, 0.0, 1.0]),
                (5, 6, 5, [0.5, 0.5, 0.0])]
    requests = {}
    loop = ServeLoop(served, eos_token_id=None)  # random experts: run every request to its end
    step = 0
    done = {}
    while step == 0 or loop.in_flight or any(a[0] >= step for a in arrivals):
        for at, length, new, w in arrivals:
            if at == step:
                prompt = torch.randint(1, VOCAB, (length,), generator=g)
                rid = loop.add(prompt, new, mix_weights=torch.tensor(w))
                requests[rid] = (prompt, new, torch.tensor(w))
        batch = loop.in_flight
        loop.step()
        finished = loop.pop_finished()
        done.update(finished)
        print(f"step {step:2d}: batch {batch}" +
              (f", finished {sorted(finished)}" if finished else ""))
        step += 1

    for rid, tokens in sorted(done.items()):
        prompt, new, w = requests[rid]
        alone = served.generate(prompt[None], mix_weights=w[None], max_new_tokens=new,
                                do_sample=False, eos_token_id=None, pad_token_id=0)
        same = torch.equal(alone[0, prompt.numel():], tokens)
        print(f"request {rid}: weights {[round(x, 2) for x in w.tolist()]}, {len(tokens)} tokens "
              f"{'equal' if same else 'DIFFER from'} its tokens served alone")
        if not same:
            raise SystemExit(f"request {rid}: {tokens.tolist()} != alone "
                             f"{alone[0, prompt.numel():].tolist()}")


if __name__ == "__main__":
    main()
