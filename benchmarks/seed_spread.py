"""How far apart can two runs of the same clan land? The spread of one method's test scores over many seeds, from the
suite's results files, and what it means for a mean over a few seeds in the suite's own units.

A candidate change to the search is judged by its gap_closed (mean over three seeds) against the defaults'. This
prints, per problem, the method's score at every seed the files hold, their standard deviation, and the standard
deviation of a mean over `--per-mean` seeds expressed as gap_closed (divided by the oracle-to-default gap of the first
file) or, for the do-no-harm problem, as harm (divided by the default's score). A difference between two candidates
smaller than about twice that figure is within what reseeding the same clan gives:

    python benchmarks/seed_spread.py benchmarks/results/quick/results.json \
        benchmarks/results/variants/results_run126_anchor_free_345.json:anchor_free \
        benchmarks/results/variants/results_run124_anchor_free_678.json:anchor_free

Each argument is a results.json, optionally with `:name` for the method or variant to read (default `clan`); the
files should hold different seeds of the same method. The first file must hold the default and oracle runs.

With `--compare LABEL=FILE[:NAME][,FILE[:NAME]...]` (repeatable) it also prints each candidate's gap_closed of its mean
over every seed its files hold beside the method's own (`--label`), against the same default and oracle, with the
count at 0.9 and the median: a comparison over more seeds than one results file holds.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

from schedule_suite import gap_closed, harm


def _entry(problem: dict, name: str) -> dict | None:
    return problem.get("methods", {}).get(name) or problem.get("variants", {}).get(name)


def _baseline(problem: dict) -> tuple[float, float | None, bool]:
    """A problem's default and oracle scores (the oracle may be missing), and whether higher is better."""
    default = _entry(problem, "default")["fitness"]
    oracle = (_entry(problem, "oracle") or {}).get("fitness")
    return default, oracle, bool(problem.get("greater_is_better"))


def seed_scores(sources: list[tuple[dict, str]], problems: list[str]) -> dict[str, dict[int, float]]:
    """Per problem of `problems`, the method's test score at every seed the files hold, whichever file holds it (a
    seed held twice keeps its first score)."""
    scores: dict[str, dict[int, float]] = {}
    for name in problems:
        scores[name] = {}
        for results, method in sources:
            entry = _entry(results["problems"].get(name, {}), method)
            for seed, run in ((entry or {}).get("per_seed") or {}).items():
                if run.get("fitness") is not None and math.isfinite(run["fitness"]):
                    scores[name].setdefault(int(seed), run["fitness"])
    return scores


def spread_table(sources: list[tuple[dict, str]], per_mean: int = 3) -> str:
    """A markdown table: each problem's scores by seed, their sd, and the sd of a `per_mean`-seed mean in gap_closed
    (or harm) units of the first file's default and oracle."""
    reference = sources[0][0]["problems"]
    rows = [
        f"| problem | score by seed | sd | sd of a mean over {per_mean} seeds |",
        "|---|---|---|---|",
    ]
    for name, by_seed in seed_scores(sources, list(reference)).items():
        values = [by_seed[seed] for seed in sorted(by_seed)]
        if len(values) < 2:
            continue
        sd = statistics.stdev(values)
        default, oracle, greater_is_better = _baseline(reference[name])
        sd_mean = sd / math.sqrt(per_mean)
        # The suite's own measures of a score one such sd better than the default (gap_closed) or worse (harm), so a
        # problem with no gap to close, or a default of 0 for harm, reads "–" as it does there.
        better = sd_mean if greater_is_better else -sd_mean
        if reference[name].get("do_no_harm"):
            value, text = harm(default, default - better, greater_is_better), "harm {:.2%}"
        else:
            value, text = gap_closed(default, default + better, oracle, greater_is_better), "gap_closed {:.3f}"
        unit = "–" if value is None else text.format(value)
        scores = " ".join(f"{value:.4f}" for value in values)
        rows.append(f"| {name} | {scores} (seeds {min(by_seed)}-{max(by_seed)}) | {sd:.4f} | {unit} |")
    return "\n".join(rows)


def _gap_text(problem: dict, mean: float) -> tuple[str, float | None]:
    """A mean score in the bar's unit against `problem`'s default and oracle, as the suite scores it: (cell text,
    gap_closed or None)."""
    default, oracle, greater_is_better = _baseline(problem)
    if problem.get("do_no_harm"):
        value = harm(default, mean, greater_is_better)
        return ("–" if value is None else f"harm {value:.2%}"), None
    gap = gap_closed(default, mean, oracle, greater_is_better)
    if gap is None:  # no gap to close: the score itself
        return f"score {mean:.4f}", None
    return f"{gap:+.3f}", gap


def pooled_table(columns: dict[str, list[tuple[dict, str]]]) -> str:
    """A markdown table: per problem of the first column's first file, each column's gap_closed of its mean over every
    seed its files hold (harm on the do-no-harm problem), against that file's default and oracle; then the count at
    gap_closed >= 0.9 and the median."""
    reference = next(iter(columns.values()))[0][0]["problems"]
    scores = {label: seed_scores(sources, list(reference)) for label, sources in columns.items()}
    rows = ["| problem | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    gaps: dict[str, list[float]] = {label: [] for label in columns}
    for name, problem in reference.items():
        cells = []
        for label in columns:
            by_seed = scores[label][name]
            if not by_seed:
                cells.append("–")
                continue
            text, gap = _gap_text(problem, statistics.fmean(by_seed.values()))
            cells.append(f"{text} ({len(by_seed)} seeds)")
            if gap is not None:
                gaps[label].append(gap)
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    summary = [
        f"{sum(g >= 0.9 for g in gap)}/{len(gap)}; median {statistics.median(gap):+.3f}" if gap else "–"
        for gap in gaps.values()
    ]
    rows.append("| **gap_closed ≥ 0.9; median** | " + " | ".join(summary) + " |")
    return "\n".join(rows)


def _sources(arguments: list[str]) -> list[tuple[dict, str]]:
    """`FILE[:NAME]` arguments, loaded: (results, method or variant name)."""
    sources = []
    for argument in arguments:
        path, _, method = argument.partition(":")
        with open(path) as f:
            sources.append((json.load(f), method or "clan"))
    return sources


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="results.json[:method or variant], seeds of one method")
    parser.add_argument("--per-mean", type=int, default=3, help="Seeds per mean, as the suite averages (3).")
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="LABEL=FILE[:NAME][,FILE[:NAME]...]",
        help="A candidate's files over several seeds, compared with the method's own by its mean over every seed.",
    )
    parser.add_argument("--label", default="method", help="The method's column in the --compare table.")
    args = parser.parse_args(argv)
    if args.per_mean < 1:
        parser.error("--per-mean must be >= 1")
    columns = {args.label: _sources(args.results)}
    for spec in args.compare:
        label, equals, files = spec.partition("=")
        if not equals or not label or not files or label in columns:
            parser.error(f"--compare {spec!r}: give LABEL=FILE[:NAME][,FILE[:NAME]...] with a label of its own")
        columns[label] = _sources(files.split(","))
    table = spread_table(columns[args.label], args.per_mean)
    if len(columns) > 1:
        table += "\n\n" + pooled_table(columns)
    print(table)
    return table


if __name__ == "__main__":
    main()
