"""Selection, reproduction and consensus for a clan: pure Python, so every rank computes the same result.

Every rank holds the genomes of all members and derives each random draw from `(seed, round)`, so the selection
plan and the mutated genomes agree across ranks without sending them; `ClanTrainer` checks that with a checksum.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import statistics
import zlib

from .genes import Gene

Genome = dict[str, Gene]

# Self-adaptation rate of the mutation scales (log-normal): exp(0.2 * N(0, 1)) moves a scale by ~20% per clone.
META_MUTATION_RATE = 0.2
# A mutation scale stays within these fractions of the gene's bounds, so it can neither freeze nor explode.
MIN_SCALE_FRACTION, MAX_SCALE_FRACTION = 1e-3, 0.25


def make_rng(seed: int, *tags: object) -> random.Random:
    """A generator that every rank seeds identically (string seeds hash with SHA-512, not PYTHONHASHSEED)."""
    return random.Random(":".join(str(t) for t in (seed, *tags)))


def reflect(y: float, low: float, high: float) -> float:
    """Fold `y` back into [low, high] like a mirror, so a gene sitting on a bound can still move away from it."""
    width = high - low
    if width <= 0:
        return low
    y = (y - low) % (2 * width)
    return low + (y if y <= width else 2 * width - y)


def mutate(genome: Genome, rng: random.Random) -> Genome:
    """A mutated copy: each gene's mutation scale first (log-normal), then its value with the new scale."""
    child = {}
    for name in sorted(genome):
        gene = genome[name]
        scale = gene.mutation_scale * math.exp(META_MUTATION_RATE * rng.gauss(0.0, 1.0))
        scale = min(max(scale, MIN_SCALE_FRACTION * gene.width), MAX_SCALE_FRACTION * gene.width)
        y = gene.to_space(gene.value) + scale * rng.gauss(0.0, 1.0)
        y = reflect(y, gene.to_space(gene.low), gene.to_space(gene.high))
        value = min(max(gene.from_space(y), gene.low), gene.high)  # exp/log round-off must not leave the bounds
        child[name] = dataclasses.replace(gene, value=value, mutation_scale=scale)
    return child


def initial_clan(base: Genome, size: int, seed: int) -> list[Genome]:
    """Member 0 keeps the configured values; the others start one mutation step around them."""
    clan = [copy_genome(base)]
    for member in range(1, size):
        rng = make_rng(seed, "initial", member)
        spread = {}
        for name in sorted(base):
            gene = base[name]
            y = gene.to_space(gene.value) + gene.mutation_scale * rng.gauss(0.0, 1.0)
            y = reflect(y, gene.to_space(gene.low), gene.to_space(gene.high))
            spread[name] = dataclasses.replace(gene, value=min(max(gene.from_space(y), gene.low), gene.high))
        clan.append(spread)
    return clan


def copy_genome(genome: Genome) -> Genome:
    return {name: dataclasses.replace(gene) for name, gene in genome.items()}


def consensus(genomes: list[Genome], name: str) -> float:
    """The value every member expresses for a specialized gene while the clan cooperates: the clan's mean."""
    return statistics.fmean(genome[name].value for genome in genomes)


def rank_members(fitness: list[float], greater_is_better: bool) -> list[int]:
    """Member ids from best to worst; NaN and infinite fitness rank last, ties by member id."""

    def badness(member: int) -> float:
        value = fitness[member]
        if not math.isfinite(value):
            return math.inf
        return -value if greater_is_better else value

    return sorted(range(len(fitness)), key=lambda m: (badness(m), m))


def selection_plan(
    fitness: list[float], greater_is_better: bool, fraction: float, rng: random.Random
) -> dict[int, int]:
    """Truncation selection: `{replaced member: member it clones}`.

    The bottom `fraction` of the clan (at least one member, at most half) is replaced by clones drawn from the top
    fraction of the same size, so the best member is never replaced and no clone source is itself replaced.
    """
    order = rank_members(fitness, greater_is_better)
    count = min(len(order) // 2, max(1, round(fraction * len(order))))
    top, bottom = order[:count], order[len(order) - count :]
    return {dst: rng.choice(top) for dst in sorted(bottom)}


def reproduce(genomes: list[Genome], plan: dict[int, int], seed: int, round_index: int) -> list[Genome]:
    """The clan's next genomes: each replaced member gets its source's genome, mutated."""
    children = [copy_genome(g) for g in genomes]
    for dst in sorted(plan):
        children[dst] = mutate(genomes[plan[dst]], make_rng(seed, "mutate", round_index, dst))
    return children


def checksum(genomes: list[Genome], plan: dict[int, int]) -> int:
    """A CRC of the clan's genetic state, gathered each round to prove that every rank holds the same one."""
    state = {
        "plan": sorted(plan.items()),
        "genomes": [[genome_values(g), genome_values(g, scales=True)] for g in genomes],
    }
    return zlib.crc32(json.dumps(state, sort_keys=True).encode())


def genome_values(genome: Genome, scales: bool = False) -> dict[str, float]:
    return {name: (gene.mutation_scale if scales else gene.value) for name, gene in sorted(genome.items())}
