"""Drawing a clan's history: fitness over rounds and every gene of every member over steps, with its lineage.

Each member slot has a colour. A line joins every record to its ancestor in the round before: the same slot, or the
member it was cloned from (a dashed link: a clone event). The best member's lineage is drawn in black on top.
Needs matplotlib: `pip install "clantune_hf[plot]"`.
"""

from __future__ import annotations

import json
import math
import os

from .genes import GENE_SPECS, LOG1P_FLOOR
from .history import SCHEDULE_NAME, best_lineage, read_history

PLOT_NAME = "clan_history.png"


def _rounds(records: list[dict]) -> tuple[list[int], dict[int, dict[int, dict]], dict[int, tuple[int, int]]]:
    """Sorted round ids, `{round: {member: record}}`, and each round's step span `(start, end)`."""
    by_round: dict[int, dict[int, dict]] = {}
    for record in records:
        by_round.setdefault(record["round"], {})[record["member"]] = record
    rounds = sorted(by_round)
    spans, start = {}, 0
    for r in rounds:
        end = next(iter(by_round[r].values()))["global_step"]
        spans[r] = (start, end)
        start = end
    return rounds, by_round, spans


def _ancestor(by_round: dict[int, dict[int, dict]], round_index: int, member: int) -> tuple[int, bool] | None:
    """The slot holding `(round_index, member)`'s ancestor in the previous round, and whether it was a clone."""
    previous = by_round.get(round_index - 1)
    if previous is None or member not in previous:
        return None
    parent = previous[member]["parent"]
    return (member, False) if parent is None else (parent, True)


def _lineage_members(output_dir: str, records: list[dict], greater_is_better: bool) -> dict[int, int]:
    """`{round: member}` along the best lineage: from clan_schedule.json when the run finished, else recomputed."""
    path = os.path.join(output_dir, SCHEDULE_NAME)
    if os.path.exists(path):
        with open(path) as f:
            return {segment["round"]: segment["member"] for segment in json.load(f)["segments"]}
    return {record["round"]: record["member"] for record in best_lineage(records, greater_is_better)}


def plot_history(output_dir: str, path: str | None = None, greater_is_better: bool = False, dpi: int = 200) -> str:
    """Draw `output_dir/clan_history.jsonl` into a PNG (default `output_dir/clan_history.png`); returns its path.

    `greater_is_better` only matters for a run that did not finish (no `clan_schedule.json` names its best lineage).
    """
    try:
        from matplotlib import colormaps
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError as error:
        raise ImportError('Plotting needs matplotlib: pip install "clantune_hf[plot]".') from error

    records = read_history(output_dir)
    if not records:
        raise ValueError(f"{output_dir}/clan_history.jsonl has no rounds yet; plot after the first round ends.")
    rounds, by_round, spans = _rounds(records)
    lineage = _lineage_members(output_dir, records, greater_is_better)
    members = sorted({record["member"] for record in records})
    genes = sorted(records[0]["genes"])
    cmap = colormaps["tab10" if len(members) <= 10 else "viridis"]
    color = {m: cmap(i if len(members) <= 10 else i / (len(members) - 1)) for i, m in enumerate(members)}
    # The best lineage is a wide translucent band behind the members' lines, so their colours stay visible.
    best_style = {"color": "black", "alpha": 0.22, "linewidth": 7, "zorder": 1, "solid_capstyle": "round"}

    fig = Figure(figsize=(8, 1.9 * (len(genes) + 1) + 0.6), layout="constrained")
    axes = fig.subplots(len(genes) + 1, 1, sharex=True)
    final_step = spans[rounds[-1]][1]

    # Fitness at the end of each round: points per member, lines to the ancestor, the best lineage on top.
    ax = axes[0]
    failed = []
    for r in rounds:
        end = spans[r][1]
        for m, record in by_round[r].items():
            if record["fitness"] is None or not math.isfinite(record["fitness"]):
                failed.append((end, m))
                continue
            ax.plot(end, record["fitness"], "o", color=color[m], markersize=4, zorder=3)
            link = _ancestor(by_round, r, m)
            if link is not None and by_round[r - 1][link[0]]["fitness"] is not None:
                previous = by_round[r - 1][link[0]]
                ax.plot(
                    [spans[r - 1][1], end],
                    [previous["fitness"], record["fitness"]],
                    color=color[m],
                    linewidth=1.0,
                    alpha=0.7,
                    linestyle="--" if link[1] else "-",
                )
    best_points = [
        (spans[r][1], by_round[r][m]["fitness"])
        for r, m in sorted(lineage.items())
        if by_round[r][m]["fitness"] is not None
    ]
    ax.plot(*zip(*best_points, strict=True), **best_style)
    for step, m in failed:  # NaN/inf fitness: a cross on the upper edge
        ax.plot(step, 1.0, "x", color=color[m], transform=ax.get_xaxis_transform(), clip_on=False, zorder=4)
    ax.set_ylabel("fitness")
    best = by_round[rounds[-1]][lineage[rounds[-1]]]
    best_text = "n/a" if best["fitness"] is None else f"{best['fitness']:.4g}"
    ax.set_title(
        f"Clan of {len(members)} members, {len(rounds)} rounds, {final_step} steps "
        f"(final best: member {best['member']}, fitness {best_text})",
        fontsize=10,
    )

    # Each gene: piecewise-constant value per member and round; links to the ancestor at round boundaries.
    for ax, name in zip(axes[1:], genes, strict=True):
        for r in rounds:
            start, end = spans[r]
            for m, record in by_round[r].items():
                value = record["genes"][name]
                ax.plot([start, end], [value, value], color=color[m], linewidth=1.3, alpha=0.85)
                link = _ancestor(by_round, r, m)
                if link is not None:
                    previous = by_round[r - 1][link[0]]["genes"][name]
                    ax.plot(
                        [start, start],
                        [previous, value],
                        color=color[m],
                        linewidth=1.0,
                        alpha=0.85,
                        linestyle="--" if link[1] else "-",
                    )
                    if link[1]:
                        ax.plot(start, value, ">", color=color[m], markersize=4, zorder=4)
        xs, ys = [], []
        for r, m in sorted(lineage.items()):
            value = by_round[r][m]["genes"][name]
            xs += [spans[r][0], spans[r][1]]
            ys += [value, value]
        ax.plot(xs, ys, **best_style)
        scale = GENE_SPECS[name].scale if name in GENE_SPECS else "linear"
        values = [by_round[r][m]["genes"][name] for r in rounds for m in by_round[r]]
        if scale == "log1p":  # 0 on the axis, decades above a thousandth of the largest value
            ax.set_yscale("symlog", linthresh=LOG1P_FLOOR * max(values) or 1.0)
        elif scale == "log":
            ax.set_yscale("log")
            narrow = math.log10(max(values) / min(values)) < 0.7  # less than a decade: label 1, 2, 3 ... 9 too
            ax.yaxis.set_major_locator(LogLocator(subs=range(1, 10) if narrow else (1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel(name.replace("_", " "))

    for ax in axes:
        for r in rounds[:-1]:
            ax.axvline(spans[r][1], color="0.85", linewidth=0.6, zorder=0)
        ax.grid(axis="y", color="0.92", linewidth=0.6)
        ax.set_xlim(0, final_step)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    axes[-1].set_xlabel("optimizer step")

    handles = [Line2D([], [], color=color[m], linewidth=1.3, label=f"member {m}") for m in members]
    handles += [
        Line2D([], [], color="0.4", linestyle="--", marker=">", markersize=4, linewidth=1.0, label="clone + mutation"),
        Line2D([], [], label="best lineage", **best_style),
    ]
    if failed:
        handles.append(Line2D([], [], color="0.4", marker="x", linestyle="", label="non-finite fitness"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), frameon=False, fontsize=8)

    path = os.path.join(output_dir, PLOT_NAME) if path is None else path
    fig.savefig(path, dpi=dpi)
    return path
