"""What the clan records: one JSON line per member per round, and the schedule along the best member's lineage.

A record describes member slot `member` during round `round`: the genes it trained with, the fitness they earned,
and `parent`, the member whose clone replaced it at that round's selection (null if it survived). The last round's
fitness is the final evaluation, after which nobody is replaced.
"""

from __future__ import annotations

import json
import math
import os

from .genetics import Genome, genome_values, rank_members

HISTORY_NAME = "clan_history.jsonl"
SCHEDULE_NAME = "clan_schedule.json"


def round_records(
    round_index: int, global_step: int, fitness: list[float], genomes: list[Genome], plan: dict[int, int]
) -> list[dict]:
    return [
        {
            "round": round_index,
            "global_step": global_step,
            "member": member,
            "fitness": fitness[member] if math.isfinite(fitness[member]) else None,
            "genes": genome_values(genome),
            "mutation_scales": genome_values(genome, scales=True),
            "parent": plan.get(member),
        }
        for member, genome in enumerate(genomes)
    ]


def write_history(output_dir: str, records: list[dict]) -> None:
    """Rewrite the whole history: it is small, and a rewrite leaves no record of a run that was rolled back."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, HISTORY_NAME), "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def read_history(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, HISTORY_NAME)) as f:
        return [json.loads(line) for line in f if line.strip()]


def _last_round(records: list[dict]) -> list[dict]:
    """The latest recorded round's records, by member (none before the first round)."""
    if not records:
        return []
    return sorted((r for r in records if r["round"] == records[-1]["round"]), key=lambda r: r["member"])


def latest_best(records: list[dict], greater_is_better: bool) -> int:
    """The best member by the latest recorded fitness (member 0, which holds the configured genes, before any)."""
    last = _last_round(records)
    if not last:
        return 0
    return last[rank_members(last_fitness(records), greater_is_better)[0]]["member"]


def member_prefix(member: int, clan_size: int) -> str:
    """The log key prefix of a member, e.g. `clan/member_07` in a clan of 12: ids zero-padded so they sort."""
    return f"clan/member_{member:0{len(str(clan_size - 1))}d}"


def last_fitness(records: list[dict]) -> list[float]:
    """Every member's fitness in the latest recorded round (NaN where it was not finite); empty before the first."""
    return [nan_if_none(r["fitness"]) for r in _last_round(records)]


def last_plan(records: list[dict]) -> dict[int, int]:
    """The latest selection as `{replaced member: source}`: the clones being judged at the next fitness."""
    return {r["member"]: r["parent"] for r in _last_round(records) if r["parent"] is not None}


def best_lineage(records: list[dict], greater_is_better: bool) -> list[dict]:
    """The records of the best final member and its ancestors, one per round, oldest first."""
    by_round: dict[int, dict[int, dict]] = {}
    for record in records:
        by_round.setdefault(record["round"], {})[record["member"]] = record
    rounds = sorted(by_round)
    member = latest_best(records, greater_is_better)
    lineage = []
    for round_index in reversed(rounds):
        lineage.append(by_round[round_index][member])
        if round_index - 1 in by_round:
            # Whoever replaced slot `member` at the previous selection is its ancestor in that round.
            parent = by_round[round_index - 1][member]["parent"]
            member = member if parent is None else parent
    return lineage[::-1]


def nan_if_none(value: float | None) -> float:
    return math.nan if value is None else value


def build_schedule(records: list[dict], round_steps: int, max_steps: int, greater_is_better: bool, base: dict) -> dict:
    """The discovered schedule: piecewise-constant gene values along the best lineage, by optimizer step.

    `segments[i]` holds for steps `start_step <= step < end_step`. A learning-rate gene scales the run's own
    scheduler (`base["lr_scheduler_type"]`), so a replay keeps that shape and uses the gene as its peak value.
    """
    lineage = best_lineage(records, greater_is_better)
    segments = [
        {
            "round": record["round"],
            "start_step": record["round"] * round_steps,
            "end_step": min((record["round"] + 1) * round_steps, max_steps),
            "member": record["member"],
            "genes": record["genes"],
        }
        for record in lineage
    ]
    return {
        "best_member": lineage[-1]["member"],
        "best_fitness": lineage[-1]["fitness"],
        "round_steps": round_steps,
        "max_steps": max_steps,
        "base": base,
        "segments": segments,
    }


def write_schedule(output_dir: str, schedule: dict) -> None:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, SCHEDULE_NAME), "w") as f:
        json.dump(schedule, f, indent=2)
