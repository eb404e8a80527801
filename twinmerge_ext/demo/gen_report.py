"""The generative job's report: results.json, results.md and results.png, each written
atomically (the same files as the classification job's)."""

from typing import Dict

from twinmerge_ext.demo.report import footer, score_cells, write_report

LABELS = {"base": "Base model, zero-shot", "expert": "LoRA experts (each on its own task)",
          "task_arithmetic": "Task arithmetic", "ties": "TIES",
          "twin": "Twin-Merging (per row, router on the prompt)",
          "twin_oracle": "(diagnostic) Twin-Merging, oracle one-hot weights"}


def gen_markdown(out: Dict[str, object]) -> str:
    names, c, m = out["tasks"], out["config"], out["methods"]
    r = c["recipe"]
    metric = {"exact": "exact match", "rouge_l": "ROUGE-L"}
    lines = [f"# Twin-Merging, generative: {len(names)} tasks, {c['model']}", "",
             f"LoRA experts: rank {r['rank']} (alpha {r['alpha']}) on "
             f"{', '.join(c['lora_targets'])}; {r['steps']} steps at batch {r['batch']}, lr "
             f"{r['lr']}, linear warmup over {r['warmup_ratio']:.0%} of the steps, linear decay, "
             f"gradient norm clipped at {r['max_grad_norm']}, "
             f"{r.get('compute_dtype', 'float32')} matmuls. Greedy decoding, up to "
             f"{c['max_new_tokens']} new tokens, continuous batching of at most "
             f"{c['eval_batch']} requests (each leaves at its first complete line).", "",
             "## Normalized score (100 × method / expert)", "",
             "| method | " + " | ".join(names) + " | mean |",
             "|---|" + "---|" * (len(names) + 1)]
    for label, row in m.items():
        lines.append(f"| {LABELS[label]} | " + " | ".join(score_cells(row, names)) + " |")
    lines += ["", "## Raw scores", "",
              "| method | " + " | ".join(f"{n} ({metric[out['metrics'][n]]})" for n in names)
              + " |", "|---|" + "---|" * len(names)]
    for label, row in m.items():
        lines.append(f"| {LABELS[label]} | " + " | ".join(
            f"{row['scores'][n]:.3f}" for n in names) + " |")
    hp = {k: v["hyperparameters"] for k, v in m.items()
          if "hyperparameters" in v and k != "twin_oracle"}
    rt, tw, tm = out["router"], out["twin"], out["timing"]
    lines += ["", "Chosen on validation: " + "; ".join(f"{LABELS[k]} {v}" for k, v in hp.items())
              + f". The twin: shared expert = task arithmetic at its scale, each exclusive delta "
              f"at rank {tw['rank']} ({tw['storage_ratio']:.2f} single models of storage)"
              + (", chosen by the validation means (normalized) " + ", ".join(
                  f"rank {r}: {a:.2f}" for r, a in rt["validation_by_rank"].items())
                 if rt["validation_by_rank"] else "") + ".", "",
              "## Router", "",
              f"An MLP on θs's hidden states entering layer {rt['layer']}, mean-pooled over the "
              f"prompt and standardized (its pass stops at that layer). Routing accuracy: "
              f"validation {rt['val_accuracy']:.3f}, test "
              f"{rt['test_accuracy']:.3f}; per task on test: " + ", ".join(
                  f"{n} {a:.3f}" for n, a in rt["test_accuracy_per_task"].items()) + ".", "",
              "## Decode speed", "",
              f"Batch {tm['batch']} ({tm['prompt_tokens']} prompt tokens), {tm['new_tokens']} new "
              f"tokens forced, fastest of {tm['rounds']} interleaved rounds; decode tokens/s = "
              f"B·(new − 1) / (generate of new − generate of 1).", "",
              "| model | decode tokens/s | generate tokens/s (prefill included) |",
              "|---|---|---|"]
    for k, v in tm["methods"].items():
        label = "Base model" if k == "base" else LABELS[k]
        lines.append(f"| {label} | {v['decode_tokens_per_s']:.0f} | "
                     f"{v['generate_tokens_per_s']:.0f} |")
    lines += ["", f"- Twin per row / task arithmetic, decode: "
              f"{tm['twin_over_task_arithmetic_decode']:.2f}×",
              f"- the router's pass over the batch's prompts: {tm['router_s'] * 1000:.0f} ms; "
              f"Twin's generate with it: {tm['twin_with_router_generate_tokens_per_s']:.0f} "
              f"tokens/s, {tm['twin_with_router_over_task_arithmetic_generate']:.2f}× task "
              f"arithmetic's generate", "", footer(out, "trained"), ""]
    return "\n".join(lines)


def write_gen_report(out: Dict[str, object], directory: str) -> None:
    write_report(out, directory, gen_markdown, protocol=None, labels=LABELS,
                 ylabel="normalized score")
