"""The main job's report: results.json, results.md (the tables) and results.png, each written
atomically."""

import json
import math
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from twinmerge_ext._files import write_atomically
from twinmerge_ext.demo import routing

_LABELS = {"expert": "Fine-tuned experts", "average": "Weight averaging",
           "task_arithmetic": "Task arithmetic", "ties": "TIES", "dare": "DARE",
           "twin": "Twin-Merging (per row, exact)", "twin_group": "Twin-Merging group-wise",
           "twin_rank1": "Twin-Merging rank 1",
           "twin_self": "Twin-Merging self-routed (one pass)",
           "twin_self_product": "Twin-Merging self-routed × text router (one pass)",
           "twin_early_two_pass": "Twin-Merging per row, the self-routing router in two passes",
           "twin_text": "Twin-Merging per row, text router (one pass)",
           "twin_text_group": "Twin-Merging group-wise, text router",
           "twin_product": "Twin-Merging per row, hidden-state × text router (two passes)",
           "twin_oracle": "(diagnostic) Twin-Merging, oracle one-hot weights"}


def normalize(scores: Sequence[float], expert: Sequence[float]
              ) -> Tuple[List[Optional[float]], Optional[float]]:
    """(100 × score / expert per task, their mean). Where the expert scores 0 (or its score is
    not a number) the ratio is undefined: None there (null in results.json, "–" in the
    tables), and the mean is over the other tasks (None if there are none)."""
    norm = [100.0 * s / e if math.isfinite(e) and e > 0 and math.isfinite(s) else None
            for s, e in zip(scores, expert)]
    defined = [x for x in norm if x is not None]
    return norm, (float(np.mean(defined)) if defined else None)


def score_cells(row: Dict[str, object], names: Sequence[str]) -> List[str]:
    """A table row's normalized cells and its mean, "–" where undefined; a mean over fewer
    than every task says over how many."""
    norm = row["normalized"]
    cells = ["–" if norm[n] is None else f"{norm[n]:.1f}" for n in names]
    mean, k = row["normalized_mean"], sum(norm[n] is not None for n in names)
    return cells + ["–" if mean is None else f"**{mean:.2f}**"
                    + ("" if k == len(names) else f" ({k} of {len(names)} tasks)")]


def markdown(out: Dict[str, object]) -> str:
    names = out["tasks"]
    c = out["config"]
    recipe = c.get("recipe", "constant")
    lines = [f"# Twin-Merging demo: {len(names)} tasks, {c['model']}", "",
             f"Experts: {c['steps']} steps at batch {c['batch']}, lr {c['lr']}, " + (
                 f"standard recipe (linear warmup over {c['warmup_ratio']:.0%} of the steps, "
                 f"linear decay, gradient norm clipped at {c['max_grad_norm']})"
                 if recipe == "standard" else "constant lr, no clipping") + ".", ""]
    for protocol, title in (("standard", "task's own head (standard protocol)"),
                            ("routed", "head of the router's argmax task")):
        lines += [f"## Normalized score, {title}", "",
                  "| method | " + " | ".join(names) + " | mean |",
                  "|---|" + "---|" * (len(names) + 1)]
        for label, row in out["methods"].items():
            r = row[protocol]
            lines.append(f"| {_LABELS[label]} | " + " | ".join(score_cells(r, names)) + " |")
        lines.append("")
    rt = out["router"]
    lines += ["The diagnostic row serves each item with one-hot weights on its true task, which no "
              "deployed router knows: the gap between it and the per-row row is routing, the gap "
              "between it and the experts is the rank-0.1 compression (and the shared expert).",
              ""] + routing.router_markdown(rt, names) + routing.self_routing_markdown(
                  rt.get("self_routing"), names) + ["## Storage and time", ""]
    s, tm = out["storage_mb"], out["timing"]
    lines += [f"- storage: twin {s['twin']:.1f} MB ({s['twin_over_one_model']:.2f} single models), "
              f"rank 1 {s['twin_rank1']:.1f} MB, the {len(names)} experts {s['experts']:.1f} MB",
              f"- time per 1000 items, measured on the first {tm['items']} items of the "
              f"stream (fastest of {tm['rounds']} interleaved rounds; static merges all cost "
              f"what task arithmetic does): router pass {rt['seconds_per_1000']:.2f} s; "
              "forward (router pass excluded): " + ", ".join(
                  f"{_LABELS[k]} {v['seconds_per_1000']:.2f} s" for k, v in out["methods"].items()
                  if "seconds_per_1000" in v) + f" (group-wise: the forward of its "
              f"{tm['group_wise_sample_groups']} groups on the sample, plus the "
              f"{tm['group_wise_merges']} merges of the stream's plan, {tm['merge_seconds']:.3f} s "
              "each, over the stream's items)",
              f"- Twin per-row / task arithmetic: {tm['twin_over_task_arithmetic']:.2f}× "
              f"(linear-layer FLOP bound {tm['factored_linear_flops_bound']:.2f}×); group-wise "
              f"{tm['group_over_task_arithmetic']:.2f}×",
              f"- end to end, router included: Twin per-row two-pass (router pass + twin) "
              f"{tm['two_pass_over_task_arithmetic']:.2f}× task arithmetic; with the "
              f"self-routing router in two passes (its pass cut short) "
              f"{tm['early_two_pass_over_task_arithmetic']:.2f}×; self-routed (one "
              f"pass, the router inside it) {tm['self_over_task_arithmetic']:.2f}×"
              + (f"; self-routed × text router (one pass) "
                 f"{tm['self_product_over_task_arithmetic']:.2f}×"
                 if "self_product_over_task_arithmetic" in tm else "") + "; text router "
              f"(one pass, no pass of θs to route) {tm['text_over_task_arithmetic']:.2f}×; "
              f"hidden-state × text router (router pass + twin) "
              f"{tm['product_over_task_arithmetic']:.2f}×"
              + (f"; text router, group-wise (router + twin) "
                 f"{tm['text_group_over_task_arithmetic']:.2f}×"
                 if "text_group_over_task_arithmetic" in tm else ""),
              f"- authors' style (dense deltas merged per sample, batch 1; the first "
              f"{tm['authors_style_items']} items, timed in the same rounds): "
              f"{tm['authors_style_seconds_per_1000']:.1f} s per 1000 items; Twin per-row is "
              f"{tm['twin_speedup_over_authors']:.1f}× faster, group-wise "
              f"{tm['group_speedup_over_authors']:.1f}× (its code keeps a dense delta for every "
              f"parameter: the frozen word embeddings' zero deltas are merged too; merging only "
              f"the non-zero ones: {tm['authors_style_nonzero_seconds_per_1000']:.1f} s per 1000 "
              f"items, per-row {tm['twin_speedup_over_authors_nonzero']:.1f}×, group-wise "
              f"{tm['group_speedup_over_authors_nonzero']:.1f}×)",
              "- every batch of 32 is run as length-bucketed micro-batches (`length_buckets`), "
              "for every method alike", ""]
    return "\n".join(lines + [footer(out, "fine-tuned"), ""])


def footer(out: Dict[str, object], trained_word: str) -> str:
    """The run's environment, wall time, experts trained and evaluation-cache counts."""
    env, ec = out["environment"], out["evaluation_cache"]
    trained = {k: v for k, v in out["fine_tune_seconds"].items() if v is not None}
    return (f"torch {env['torch']}, {env['threads']} threads, {env['machine']}, {env['date']}; "
            f"wall time {out['wall_seconds']:.0f} s ("
            + (f"{len(trained)} experts {trained_word} in {sum(trained.values()):.0f} s"
               if trained else "experts cached")
            + f"; evaluation cache: {ec['reused']} results reused, {ec['computed']} computed)")


def plot(out: Dict[str, object], path: str, protocol: Optional[str] = "routed",
         labels: Optional[Dict[str, str]] = None,
         ylabel: str = "normalized score (routed heads)") -> None:
    """Bars of each method's normalized score per task (`protocol`: which of a method's
    protocols, None for a method row without protocols)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = _LABELS if labels is None else labels
    names, methods = out["tasks"], list(out["methods"])
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(names)) + 3, 4))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        row = out["methods"][m] if protocol is None else out["methods"][m][protocol]
        vals = [np.nan if row["normalized"][n] is None else row["normalized"][n] for n in names]
        ax.bar(np.arange(len(names)) + i * width, vals, width, label=labels[m])
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.axhline(100, color="k", lw=0.5)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: Dict[str, object], directory: str,
                 markdown_fn: Callable[[Dict[str, object]], str] = markdown,
                 **plot_kw) -> None:
    """results.json, results.md (markdown_fn's tables) and results.png (`plot` with plot_kw)
    in `directory`, each written atomically."""
    os.makedirs(directory, exist_ok=True)
    files = {"results.json": json.dumps(out, indent=2), "results.md": markdown_fn(out)}
    for name, text in files.items():
        def write(tmp, text=text):
            with open(tmp, "w") as f:
                f.write(text)
        write_atomically(os.path.join(directory, name), write, "twinmerge-demo")
    write_atomically(os.path.join(directory, "results.png"),
                     lambda tmp: plot(out, tmp, **plot_kw), "twinmerge-demo")
