"""The generative job: its pieces on a tiny Llama built from a config (the answer-only loss, the
cached LoRA experts, left padding, scoring, decode timing), and its quick path end to end on the
real model and data (fetched into the demo cache), so `twinmerge-demo --generative` cannot rot."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("peft", reason="the generative job's experts are PEFT LoRA adapters")
transformers = pytest.importorskip("transformers")

from twinmerge_ext import LoraExpert  # noqa: E402
from twinmerge_ext._files import publish_directory  # noqa: E402
from twinmerge_ext.demo import gen_data, gen_model as gm  # noqa: E402
from twinmerge_ext.demo import generative  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A 2-layer Llama with a 64-token vocabulary, saved as a model folder."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, pad_token_id=2, eos_token_id=2,
                                      bos_token_id=1, tie_word_embeddings=True)
    path = str(tmp_path_factory.mktemp("tiny"))
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def _rows(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows, starts = [], []
    for i in range(n):
        p, a = 3 + i % 3, 2 + i % 2
        rows.append(torch.randint(3, 64, (p + a,), generator=g).tolist())
        starts.append(p)
    return rows, starts


def test_answer_loss_is_the_causal_lm_loss_with_the_prompt_masked(tiny_dir):
    model = gm.load_model(tiny_dir)
    rows, starts = _rows(5)
    width = max(map(len, rows))
    ids = torch.full((5, width), 2)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, (r, s) in enumerate(zip(rows, starts)):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
        labels[i, s:len(r)] = torch.tensor(r[s:])
    want = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    got = gm.answer_loss(model, rows, starts, pad=2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_left_pad_puts_each_prompt_at_the_right_edge():
    ids, mask = gm.left_pad([[5, 6, 7], [8]], pad=2)
    assert ids.tolist() == [[5, 6, 7], [2, 2, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_lr_schedule_warms_up_then_decays_to_zero():
    r = gm.LoraRecipe(steps=100, warmup_ratio=0.06)
    f = [gm.lr_factor(s, r) for s in range(100)]
    assert f[0] == pytest.approx(1 / 6) and f[5] == 1.0 and f[6] == 1.0
    assert f[99] == pytest.approx(1 / 94) and all(a >= b for a, b in zip(f[5:], f[6:]))


def test_train_lora_trains_caches_and_gives_a_lora_expert(tiny_dir, tmp_path):
    rows, starts = _rows(12)
    data = gm.TrainSet(rows, starts)
    recipe = gm.LoraRecipe(steps=3, batch=4, lr=1e-2)
    seconds, logs = {}, []
    path = gm.train_lora("t", data, recipe, tiny_dir, str(tmp_path), logs.append, seconds)
    assert seconds["t"] > 0 and os.path.isfile(os.path.join(path, "adapter_config.json"))
    lora = LoraExpert(path)
    assert {k.rsplit(".", 2)[-2] for k in lora.targets} == set(gm.LORA_TARGETS)
    assert any(float(lora.delta(k).abs().max()) > 0 for k in lora.targets)  # B moved from 0
    # No temporary directory left beside it; a second call reads the cache, trains nothing.
    assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]
    again = gm.train_lora("t", data, recipe, tiny_dir, str(tmp_path), logs.append, seconds)
    assert again == path and seconds["t"] is None and "cached" in logs[-1]
    # Other data, other expert.
    other = gm.train_lora("t", gm.TrainSet(rows[:8], starts[:8]), recipe, tiny_dir,
                          str(tmp_path), logs.append, {})
    assert other != path
    # Mixed precision is the default; float32 throughout is another expert.
    fp32 = gm.train_lora("t", data, dataclasses.replace(recipe, compute_dtype="float32"),
                         tiny_dir, str(tmp_path), logs.append, {})
    first = next(iter(lora.targets))
    assert fp32 != path and not torch.equal(LoraExpert(fp32).delta(first), lora.delta(first))
    with pytest.raises(ValueError, match="train_lora: recipe.compute_dtype must be 'bfloat16' "
                                         "or 'float32', got 'float16'"):
        gm.train_lora("t", data, dataclasses.replace(recipe, compute_dtype="float16"),
                      tiny_dir, str(tmp_path), logs.append, {})


def test_publish_directory_is_all_or_nothing(tmp_path):
    target, fn = str(tmp_path / "d"), "twinmerge-demo"

    def fill(name):
        return lambda tmp: open(os.path.join(tmp, name), "w").close()

    def fail(tmp):
        os.makedirs(os.path.join(tmp, "sub"))
        open(os.path.join(tmp, "sub", "half"), "w").close()
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        publish_directory(target, fail, "done", fn)
    assert os.listdir(tmp_path) == []  # nothing under the name, no temporary left
    # A dead writer's temporary (no lock held) is removed by the next publish.
    stale = tmp_path / ".d.0123456789abcdef.tmpdir" / "d"
    stale.mkdir(parents=True)
    (stale / "part").write_bytes(b"x")
    umask = os.umask(0o022)
    try:
        assert publish_directory(target, fill("done"), "done", fn) is True
    finally:
        os.umask(umask)
    assert os.listdir(tmp_path) == ["d"] and os.stat(target).st_mode & 0o777 == 0o755
    # A whole directory there is kept; a later writer's copy is dropped.
    assert publish_directory(target, fill("other"), "done", fn) is False
    assert os.listdir(target) == ["done"] and os.listdir(tmp_path) == ["d"]
    # A directory without the marker (an unsynced writer's) is replaced.
    os.remove(os.path.join(target, "done"))
    assert publish_directory(target, fill("done"), "done", fn) is True
    assert os.listdir(target) == ["done"] and os.listdir(tmp_path) == ["d"]


def test_task_scores_and_normalization():
    items = [gen_data.GenItem("go", "went", ("went",)), gen_data.GenItem("be", "was",
                                                                        ("was", "were")),
             gen_data.GenItem("Lleida", "Spain", ("Spain", "Kingdom of Spain"))]
    stream = generative.Stream([[1], [2], [3]], [0, 0, 1], items)
    names = ["past_tense", "province_country"]
    assert generative.task_scores(["Went.", "is", "kingdom of  spain"], stream, names) == [
        0.5, 1.0]

    from twinmerge_ext.demo.report import normalize, score_cells
    assert normalize([0.5, 1.0], [1.0, 0.8]) == ([50.0, 125.0], 87.5)
    # An expert scoring 0 (or a task without a score) leaves its ratio undefined: null in the
    # JSON, never NaN, "–" in the table, and the mean over the other tasks says so.
    norm, mean = normalize([0.5, 0.3, float("nan")], [1.0, 0.0, 0.5])
    assert norm == [50.0, None, None] and mean == 50.0
    assert "NaN" not in json.dumps({"n": norm, "m": mean})
    row = {"normalized": dict(zip("abc", norm)), "normalized_mean": mean}
    assert score_cells(row, "abc") == ["50.0", "–", "–", "**50.00** (1 of 3 tasks)"]
    assert normalize([0.2], [0.0]) == ([None], None)
    assert score_cells({"normalized": {"a": None}, "normalized_mean": None}, "a") == ["–", "–"]


def test_decode_speed_subtracts_the_prefill():
    import time
    calls = []

    def job(ids, mask, n, pad):  # 10 ms of prefill, 1 ms per further token
        calls.append(n)
        time.sleep(0.010 + 0.001 * (n - 1))
    ids = torch.zeros(4, 3, dtype=torch.long)
    r = generative.decode_speed({"m": job}, ids, torch.ones_like(ids), 2, new=21, rounds=2)
    assert calls == [2, 1, 21, 1, 21]  # an untimed warm-up first
    # 4 rows × 20 decode tokens in 20 ms: ~4000 tokens/s (sleep only overshoots).
    assert 1000 < r["m"]["decode_tokens_per_s"] <= 4000 * 1.01


def test_the_generative_flag_checks_its_arguments():
    from twinmerge_ext.demo.run import main
    with pytest.raises(SystemExit):
        main(["--generative", "--tasks", "movie_polarity"])
    with pytest.raises(SystemExit):
        main(["--generative", "--recipe", "constant"])
    with pytest.raises(SystemExit):
        main(["--tasks", "past_tense"])
    with pytest.raises(SystemExit):  # one task: nothing to route between
        main(["--generative", "--tasks", "past_tense", "past_tense"])
    with pytest.raises(SystemExit):  # the classification job always scores its oracle row
        main(["--oracle"])
    assert not generative.GenConfig().oracle and generative.GenConfig.quick_config().oracle
    assert not generative.GenConfig.quick_config(oracle=False).oracle
    with pytest.raises(ValueError, match=r"GenConfig: timing_new_tokens must be an int >= 2, "
                                         r"got 1"):
        generative.GenConfig(timing_new_tokens=1).check()
    with pytest.raises(ValueError, match=r"GenConfig: tasks must be at least 2 distinct"):
        generative.GenConfig(tasks=("foldoc",)).check()
    with pytest.raises(ValueError, match=r"GenConfig: twin_ranks must be ints >= 1"):
        generative.GenConfig(twin_ranks=()).check()
    generative.GenConfig().check()
    generative.GenConfig.quick_config().check()


pytest.importorskip("gguf", reason="the generative job reads its model's GGUF file once: "
                    "pip install gguf==0.19.0 (make test installs it)")


def test_quick_generative_job_runs_reports_and_a_rerun_reuses_every_result(tmp_path):
    out = tmp_path / "results"

    def job(*flags):
        run = subprocess.run([sys.executable, "-m", "twinmerge_ext.demo", "--generative",
                              "--quick", "--out", str(out), *flags], capture_output=True,
                             text=True, timeout=1200, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert run.returncode == 0, run.stderr[-3000:]
        return run, json.loads((out / "results.json").read_text())
    run, res = job("--recompute")
    assert (out / "results.png").stat().st_size > 1000
    md = (out / "results.md").read_text()
    assert md in run.stdout and "Twin-Merging (per row, router on the prompt)" in md
    tasks = res["tasks"]
    assert tasks == ["past_tense", "province_country"]
    assert set(res["methods"]) == {"expert", "base", "task_arithmetic", "ties", "twin",
                                   "twin_oracle"}
    assert res["methods"]["expert"]["scores"]["past_tense"] > 0.2  # learnt in a few steps
    for m, row in res["methods"].items():
        assert set(row["normalized"]) == set(tasks) and 0 <= row["normalized_mean"] <= 300
    # The prompts name their task: the router tells them apart.
    assert res["router"]["val_accuracy"] > 0.9 and res["router"]["test_accuracy"] > 0.9
    tm = res["timing"]
    assert tm["batch"] == res["config"]["eval_batch"] == 32
    for m in ("base", "task_arithmetic", "twin"):
        assert tm["methods"][m]["decode_tokens_per_s"] > 0
    assert res["evaluation_cache"]["computed"] > 0
    _, again = job()
    assert again["evaluation_cache"]["computed"] == 0
    assert again["methods"] == res["methods"]


class _CharTok:
    """A tokenizer stand-in for `serve`: tokens 1, 10, 19, ... are newlines, 5, 14, ... spaces,
    2 the end."""

    def convert_tokens_to_ids(self, token):
        assert token == gm.EOS
        return 2

    def decode(self, tokens, skip_special_tokens=True):
        tokens = tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens
        return "".join({1: "\n", 5: " "}.get(t % 9, chr(ord("a") + t % 26)) for t in tokens
                       if t != 2)


@pytest.mark.parametrize("kind", ["plain", "twin"])
def test_serve_gives_each_prompt_its_own_prediction(kind):
    """serve (continuous batching, a few places in flight, requests leaving at their line's
    end or at EOS) predicts for every prompt what its own generate, run to max_new_tokens,
    predicts."""
    from twinmerge_ext import TwinCheckpoint, TwinMergedModule
    torch.manual_seed(0)  # a tiny Llama with large weights: varied greedy tokens
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=2, eos_token_id=2,
        tie_word_embeddings=False, initializer_range=0.5)).eval()
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 64, (int(n),), generator=g).tolist()
               for n in torch.randint(1, 7, (23,), generator=g)]
    stream = generative.Stream(prompts, [0] * len(prompts), [None] * len(prompts))
    cfg = generative.GenConfig(eval_batch=4, max_new_tokens=12)
    tok = _CharTok()
    served, weights = model, None
    if kind == "twin":
        base = {k: v.clone() for k, v in model.state_dict().items()}
        experts = {t: {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
                   for t in ("a", "b")}
        served = TwinMergedModule(model, TwinCheckpoint.build(base, experts, rank=2),
                                  mode="factored")
        weights = torch.softmax(torch.randn(len(prompts), 2, generator=g), -1)
    got = generative.serve(served, stream, tok, cfg, weights)
    ended_early = 0
    for i, p in enumerate(prompts):
        kw = {} if weights is None else {"mix_weights": weights[i:i + 1]}
        out = served.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False,
                              pad_token_id=2, eos_token_id=2, **kw)[0, len(p):]
        text = tok.decode(out)
        assert got["pred"][i] == generative.prediction(text), i
        ended_early += "\n" in text.lstrip().rstrip("\n")
    assert ended_early >= 3  # lines really ended before the generated text did
