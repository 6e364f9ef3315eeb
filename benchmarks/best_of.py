"""The most any measured configuration of the clan reached on each problem: how close one set of defaults could come to
the bar, judged from every results file kept.

For each problem of the reference (a results.json with the default and oracle runs, by default the quick suite's),
every configuration in the files (the `clan` and `pbt` methods and every variant) that ran the problem as the
reference defines it (the same start, genes and steps) with a clan of the reference's size and per-device batch, at
every seed of `--seeds`, is scored as the suite scores it: gap_closed of its mean over those seeds (harm on the
do-no-harm problem) against the reference's default and oracle. It prints each problem's best configuration, then the
configurations that reach gap_closed >= 0.9 on the most problems:

    python benchmarks/best_of.py benchmarks/results/quick/results.json benchmarks/results/variants/*.json

Files run by older versions of the search count as configurations too (each variant is the defaults of its day plus
its change). The best of many noisy configurations is biased upward, so a problem whose best stays under the bar is
out of reach of everything measured, not only of the defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

from schedule_suite import GAP_BAR, gap_closed, harm, same_problem
from seed_spread import _baseline

# What makes two runs of a problem comparable besides the problem itself (`same_problem`, and the problem's own
# budget): the clan's size, its batch and the suite's budget.
SETTING_KEYS = ("num_processes", "per_device_batch", "steps")


def configurations(paths: list[str], reference: dict, seeds: list[str]) -> dict[str, dict[str, float]]:
    """{configuration: {problem: mean score over `seeds`}} for every run in `paths` comparable with `reference`;
    a configuration is named `FILE:NAME`."""
    found: dict[str, dict[str, float]] = {}
    settings = {key: reference["settings"].get(key) for key in SETTING_KEYS}
    for path in paths:
        with open(path) as f:
            results = json.load(f)
        if {key: results.get("settings", {}).get(key) for key in SETTING_KEYS} != settings:
            continue
        for name, problem in results["problems"].items():
            ours = reference["problems"].get(name)
            if ours is None or not same_problem(problem, ours) or problem.get("steps") != ours.get("steps"):
                continue
            entries = {m: problem.get("methods", {}).get(m) for m in ("clan", "pbt")} | problem.get("variants", {})
            for entry_name, entry in entries.items():
                per_seed = (entry or {}).get("per_seed") or {}
                scores = [(per_seed.get(seed) or {}).get("fitness") for seed in seeds]
                if all(isinstance(score, float) and math.isfinite(score) for score in scores):
                    found.setdefault(f"{path}:{entry_name}", {})[name] = statistics.fmean(scores)
    return found


def _figure(problem: dict, score: float) -> float | None:
    """`score` in the bar's unit, larger is better: gap_closed, or minus the harm on the do-no-harm problem."""
    default, oracle, greater_is_better = _baseline(problem)
    if problem.get("do_no_harm"):
        value = harm(default, score, greater_is_better)
        return None if value is None else -value
    return gap_closed(default, score, oracle, greater_is_better)


def best_of_table(reference: dict, found: dict[str, dict[str, float]], top: int = 5) -> str:
    """Markdown: each problem's best configuration and its figure; then the `top` configurations by the number of
    problems they bring to the bar (among those that ran every problem)."""
    problems = reference["problems"]
    mis_set = [name for name, problem in problems.items() if not problem.get("do_no_harm")]
    figures = {
        config: {name: _figure(problems[name], score) for name, score in scores.items()}
        for config, scores in found.items()
    }
    rows = ["| problem | best figure | configuration | configurations |", "|---|---|---|---|"]
    reached = 0
    for name in problems:
        candidates = [(by_problem[name], config) for config, by_problem in figures.items()
                      if by_problem.get(name) is not None]  # fmt: skip
        if not candidates:
            rows.append(f"| {name} | – | – | 0 |")
            continue
        best, config = max(candidates)
        reached += name in mis_set and best >= GAP_BAR
        text = f"harm {-best:.2%}" if name not in mis_set else f"{best:+.3f}"
        rows.append(f"| {name} | {text} | `{config}` | {len(candidates)} |")
    rows.append(f"| **problems some configuration brings to gap_closed ≥ {GAP_BAR}** | {reached}/{len(mis_set)} | | |")

    counts = {
        config: sum((by_problem[name] or -1) >= GAP_BAR for name in mis_set)
        for config, by_problem in figures.items()
        if all(name in by_problem for name in mis_set)
    }
    rows += ["", f"| configuration (of {len(counts)} that ran every problem) | gap_closed ≥ {GAP_BAR} |", "|---|---|"]
    for config in sorted(counts, key=lambda config: -counts[config])[:top]:
        rows.append(f"| `{config}` | {counts[config]}/{len(mis_set)} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="results.json files; the first is the reference (default, oracle)")
    parser.add_argument("--seeds", default="0,1,2", help="The seeds a configuration must have run, as the bar's mean.")
    parser.add_argument("--top", type=int, default=5, help="How many configurations to list by problems at the bar.")
    args = parser.parse_args(argv)
    with open(args.results[0]) as f:
        reference = json.load(f)
    found = configurations(args.results, reference, args.seeds.split(","))
    table = best_of_table(reference, found, args.top)
    print(table)
    return table


if __name__ == "__main__":
    main()
