"""Markdown of a bench.run results file: the run's machine, then every issue-5 target with its
value and verdict, then each case's times against its baselines.

    python -m bench.report bench/results/NAME.json [--out NAME.md]

For the README and the issue notes, written from the JSON rather than copied by hand.
"""

import argparse
import json
import sys
from pathlib import Path


def _shape(row):
    return ", ".join(f"{k}={v}" for k, v in row.get("shape", {}).items() if k != "dtype")


def _environment(env):
    rate = ", ".join(f"{k.removeprefix('torch.')} {v / 1e12:.1f} TFLOP/s"
                     for k, v in env.get("gemm_rate", {}).items())
    return (f"{env.get('device')}; torch {env.get('torch')}, CUDA {env.get('cuda')}, "
            f"{env.get('threads')} threads; git {env.get('git')}; {env.get('date')}; "
            f"copy {env.get('copy_bandwidth', 0) / 1e9:.1f} GB/s; GEMM {rate}")


def suite_markdown(name, suite):
    env, rows = suite["environment"], suite["results"]
    out = [f"### {name} suite", "", _environment(env), ""]
    targets = [(row, t) for row in rows for t in row.get("targets", [])]
    if targets:
        out += ["| case | target | value | limit | |", "|---|---|---|---|---|"]
        out += [f"| `{row.get('case', row['op'])}` | {t['target']} | {t['value']:.3f} | "
                f"{t['limit']} | {'met' if t['met'] else '**not met**'} |" for row, t in targets]
        out.append("")
    out += ["| case | shape | ours (ms) | baseline: ms (ours ÷ it) | ours ÷ floor, bound, ... |",
            "|---|---|---|---|---|"]
    for row in rows:
        case = f"`{row.get('case', row['op'])}`"
        if "times" not in row:
            why = row.get("skipped") or row.get("error") or "no times"
            out.append(f"| {case} | {_shape(row)} | | {why} | |")
            continue
        ours = row["times"]["ours"]["median_ms"]
        others = "; ".join(f"{k}: {t['median_ms']:.3g} ({ours / t['median_ms']:.2f})"
                           for k, t in row["times"].items() if k != "ours")
        ratios = "; ".join(f"{k.removeprefix('ours_over_')} {v:.2f}" for k, v in row.items()
                           if k.startswith("ours_over_") and isinstance(v, (int, float)))
        out.append(f"| {case} | {_shape(row)} | {ours:.3g} | {others} | {ratios} |")
    return "\n".join(out) + "\n"


def report(results):
    return "\n".join(suite_markdown(name, suite) for name, suite in results.items())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a JSON file written by bench.run --out")
    parser.add_argument("--out", type=Path, help="write the Markdown here instead of stdout")
    args = parser.parse_args(argv)
    try:
        results = json.loads(args.results.read_text())
    except (OSError, json.JSONDecodeError) as e:
        parser.error(f"results: cannot read {args.results}: {e}")
    if not isinstance(results, dict) or not all(
            isinstance(s, dict) and {"environment", "results"} <= s.keys() for s in results.values()):
        parser.error(f"results: {args.results} is not a bench.run results file "
                     f"(expected {{suite: {{environment, results}}}})")
    text = report(results)
    if args.out:
        args.out.write_text(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
