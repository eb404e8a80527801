"""Generative serving: what Twin-Merging per row costs a causal LM's prefill and decode, against
the statically merged model (task arithmetic: the plain model, nothing mixed), side by side in
one run.

    python -m bench.generation --out bench/results/generation-cpu.json

The model is a Llama with SmolLM2-135M's widths (hidden 576, 9 heads, 3 KV heads, MLP 1536,
vocabulary 49152; fewer layers, `--layers`), built from its config, with T LoRA-like experts
(rank-`--rank` deltas on every attention and MLP matrix), compressed at their own rank.
Cases (ours / the plain model; < 1 is faster):
- prefill: one forward of the prompt batch [B, L] with a KV cache, per-row weights (factored)
  against the plain model.
- decode: one step at batch B from a cache of L + 16 tokens: factored per-row weights, and the
  one-vector merge (materialize: the plain model on merged buffers), against the plain model;
  reported as tokens per second too.
- router: the router's pass of θs over the prompt (once per request), against the prefill.
- generate: served.generate with per-row weights (router not included) against the plain
  model's generate, NEW tokens each, greedy: the end-to-end decode tokens/s.
- serve_loop: ServeLoop serving the same requests (each its own weights, all joining at once)
  against served.generate on the batch.
"""

import argparse
from pathlib import Path

import torch

from bench.reliability import _row
from bench.run import _synthetic_experts, _write, environment
from bench.timing import measure_all
from twinmerge_ext import ServeLoop, TwinCheckpoint, TwinMergedModule, TwinRouter

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
               intermediate_size=1536, max_position_embeddings=2048, tie_word_embeddings=True,
               bos_token_id=1, eos_token_id=2, pad_token_id=2)


def llama_case(layers=4, T=6, rank=8, seed=0, **widths):
    """(make: () -> a fresh model with the base weights, twin) of a SmolLM2-shaped Llama."""
    transformers = __import__("transformers")
    cfg = transformers.LlamaConfig(**{**SMOLLM2, **widths, "num_hidden_layers": layers})
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}

    def make():
        m = transformers.LlamaForCausalLM(cfg).eval()
        m.load_state_dict(base)
        return m

    g = torch.Generator().manual_seed(seed)
    changed = [k for k in base if k.endswith("proj.weight")]
    experts = _synthetic_experts(base, T, changed, g, signal_rank=rank, noise=0.0)
    return make, TwinCheckpoint.build(base, experts, rank=rank)


def _weights(B, T, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(2 * torch.randn(B, T, generator=g), -1)


def run(layers=4, T=6, rank=8, B=32, L=32, new=16, rounds=3, runs=3, **widths):
    make, twin = llama_case(layers, T, rank, **widths)
    vocab = widths.get("vocab_size", SMOLLM2["vocab_size"])
    w = _weights(B, T)
    plain = make()
    plain.load_state_dict(twin.merged_state_dict(torch.full((T,), 1.0 / T)))
    served = TwinMergedModule(make(), twin, mode="factored")
    merged = TwinMergedModule(make(), twin, mode="materialize")
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, vocab, (B, L), generator=g)
    mask = torch.ones_like(ids)
    shape = dict(layers=layers, T=T, rank=rank, B=B, L=L, new=new,
                 hidden=widths.get("hidden_size", SMOLLM2["hidden_size"]))
    rows = []

    def prefill(model, **kw):
        return model(input_ids=ids, attention_mask=mask, use_cache=True, **kw)

    with torch.no_grad():
        # Correctness first: the factored logits equal the plain model's for one weight vector.
        one = w[:1].expand(B, T)
        ref = make()
        ref.load_state_dict(twin.merged_state_dict(w[0]))
        diff = (prefill(served, mix_weights=one).logits - prefill(ref).logits).abs().max()
        assert diff < 1e-3, f"factored logits differ from the plain model's by {diff}"

        times = measure_all({"factored": lambda: prefill(served, mix_weights=w),
                             "plain": lambda: prefill(plain)}, rounds=rounds, runs=runs,
                            warmup=1)
        rows.append(_row("prefill", times, "plain", shape=shape,
                         tokens_per_s={k: B * L / (v.median_ms * 1e-3) for k, v in times.items()}))

        # materialize: one merge for the request (a merged() block, as generate does), then
        # every step serves the merged buffers.
        with merged.merged(w[0]):
            caches = {}
            for name, model, kw in (("factored", served, dict(mix_weights=w)),
                                    ("materialize", merged, {}),
                                    ("plain", plain, {})):
                out = model(input_ids=ids, attention_mask=mask, use_cache=True, **kw)
                caches[name] = (out.cache, kw)
            step_ids = torch.randint(3, vocab, (B, 1), generator=g)
            step_mask = torch.ones(B, L + 17, dtype=torch.long)
            pos = torch.full((B, 1), L + 16)

            def decode(model, name):
                """One step from a cache of L + 16 tokens (grown once, cropped back after)."""
                cache, kw = caches[name]
                n = cache.get_seq_length()
                if n > L + 16:
                    cache.crop(L + 16 - n)
                while cache.get_seq_length() < L + 16:
                    n = cache.get_seq_length()
                    model(input_ids=step_ids, attention_mask=step_mask[:, :n + 1],
                          position_ids=torch.full((B, 1), n), cache=cache, **kw)
                return model(input_ids=step_ids, attention_mask=step_mask, position_ids=pos,
                             cache=cache, **kw)

            times = measure_all({"factored": lambda: decode(served, "factored"),
                                 "materialize": lambda: decode(merged, "materialize"),
                                 "plain": lambda: decode(plain, "plain")},
                                rounds=rounds, runs=runs, warmup=1)
        rows.append(_row("decode", times, "plain", shape=shape,
                         tokens_per_s={k: B / (v.median_ms * 1e-3) for k, v in times.items()}))

        router = TwinRouter(SMOLLM2["hidden_size"] if "hidden_size" not in widths
                            else widths["hidden_size"], twin.tasks).eval()
        routed = TwinMergedModule(make(), twin, router=router, mode="factored")
        times = measure_all({"router": lambda: routed.route(ids, attention_mask=mask),
                             "prefill": lambda: prefill(served, mix_weights=w)},
                            rounds=rounds, runs=runs, warmup=1)
        rows.append(_row("router", times, "prefill", shape=shape))

        kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
        times = measure_all({"factored": lambda: served.generate(ids, attention_mask=mask,
                                                                 mix_weights=w, **kw),
                             "plain": lambda: plain.generate(ids, attention_mask=mask, **kw)},
                            rounds=rounds, runs=1, min_run_time=0.0, warmup=0)
        rows.append(_row("generate", times, "plain", shape=shape,
                         tokens_per_s={k: B * new / (v.median_ms * 1e-3)
                                       for k, v in times.items()}))

        def loop():
            sl = ServeLoop(served, eos_token_id=None)
            for b in range(B):
                sl.add(ids[b], new, mix_weights=w[b])
            return sl.run()

        times = measure_all({"serve_loop": loop,
                             "generate": lambda: served.generate(ids, attention_mask=mask,
                                                                 mix_weights=w, **kw)},
                            rounds=rounds, runs=1, min_run_time=0.0, warmup=0)
        rows.append(_row("serve_loop", times, "generate", shape=shape))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=6)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=16)
    args = parser.parse_args(argv)
    env = environment(torch.device("cpu"))
    rows = run(args.layers, args.experts, args.rank, args.batch, args.prompt, args.new)
    for row in rows:
        ratios = "  ".join(f"{k}: {v:.3f}x" for k, v in row["ratios"].items())
        tps = row.get("tokens_per_s")
        extra = ("  tokens/s " + ", ".join(f"{k} {v:.0f}" for k, v in tps.items())) if tps else ""
        print(f"{row['case']:<11} against {row['baseline']:<9} {ratios}{extra}", flush=True)
    if args.out:
        _write(args.out, dict(environment=env, results=rows))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
