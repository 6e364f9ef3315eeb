"""Selection, reproduction and consensus for a clan: pure Python, so every rank computes the same result.

Every rank holds the genomes of all members and derives each random draw from `(seed, round)`, so the selection
plan and the mutated genomes agree across ranks without sending them; `ClanTrainer` checks that with a checksum.

The search (docs/search.md explains it with its references):

- **Initial spread.** Member 0 keeps the configured values; members 1..P-1 are a Latin hypercube over each gene's
  bounds (one stratum of the bounds per member, in the gene's scale space), so a start that is 100x off already has
  a member near the optimum in round one.
- **Truncation selection.** The bottom fraction is replaced by clones of the top fraction; the best member is never
  replaced. Optionally (`selection_confidence`) a member is replaced only when its source beats it significantly,
  by a paired t-test over the eval batches; with `select_in_warmup=False`, rounds that end inside the scheduler's
  warmup replace only members whose fitness is not finite.
- **Holding the best** (`hold_confidence`, by default on in a clan of eight or more). From the second round on, while
  the clan's best fitness improves, one member the best beats significantly (the same paired test) becomes its exact
  copy, so it shares gradients with a copy of itself; when it stops improving, the copy explores again as a mutated
  clone of it.
- **Mutation.** A clone mutates each gene's mutation scale first (log-normal self-adaptation), then the value with
  the new scale, reflected into the bounds. Clones made in the same round come in mirrored pairs (`u + s*z`,
  `u - s*z`), and each gene is instead drawn afresh from its bounds with probability `resample_probability`.
- **Integer genes** (`gradient_accumulation_steps`, or a user's) mutate in their scale space like the others and are
  rounded; their mutation scale stays above half a step and may grow past one, so a gene never sticks to a value.
- **Step-size control.** Under elitism, self-adaptation alone rewards small steps, so the scale shrinks while a gene
  is still far from its optimum. The success rule corrects it: when a clone beats its parent on the next fitness,
  both their scales grow; when it does not, both shrink, four times more slowly (Rechenberg's 1/5th rule).
- **Who shares.** While the clan cooperates, members whose optimizer genes lie far from the last round's best
  member's (`solo_radius`; from the clan's median when none is near the best) train alone, so the best shares
  gradients only with members that learn at its pace.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import statistics
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from .genes import OPTIMIZER, Gene

Genome = dict[str, Gene]

# Self-adaptation rate of the mutation scales (log-normal): exp(0.2 * N(0, 1)) moves a scale by ~20% per clone.
META_MUTATION_RATE = 0.2
# A mutation scale stays within these fractions of the gene's bounds, so it can neither freeze nor explode.
MIN_SCALE_FRACTION, MAX_SCALE_FRACTION = 1e-3, 0.25
# The 1/5th success rule: a success grows a scale by exp(1/3), a failure shrinks it by exp(-1/12), so the scale is
# stationary when one clone in five beats its parent.
SUCCESS_GROWTH, FAILURE_SHRINK = math.exp(1 / 3), math.exp(-1 / 12)

SPREADS = ("stratified", "local")
STEP_SIZE_CONTROLS = ("success", "self_adaptive")
SOLO_CENTERS = ("best", "median")  # what `solo_radius` is measured from


@dataclass(frozen=True)
class Search:
    """How the clan searches: the `ClanConfig` fields of the same names."""

    initial_spread: str = "stratified"
    initial_spread_width: float = 1.0
    resample_probability: float = 0.25
    step_size_control: str = "success"
    mirrored: bool = True


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


def _clamp_scale(gene: Gene, scale: float) -> float:
    # An integer gene's scale stays above half its largest step and can grow past it, so it never freezes.
    low = max(MIN_SCALE_FRACTION * gene.width, gene.unit / 2)
    return min(max(scale, low), max(MAX_SCALE_FRACTION * gene.width, 2 * gene.unit))


def _at(gene: Gene, y: float) -> float:
    """The gene's value at point `y` of its scale space, reflected into its bounds (and rounded, for an integer)."""
    y = reflect(y, gene.to_space(gene.low), gene.to_space(gene.high))
    value = gene.from_space(y)
    if gene.integer:
        value = float(round(value))
    return min(max(value, gene.low), gene.high)  # exp/log round-off must not leave the bounds


def mutate(genome: Genome, rng: random.Random, resample_probability: float = 0.0, mirror: bool = False) -> Genome:
    """A mutated copy: each gene's mutation scale first (log-normal), then its value with the new scale.

    With probability `resample_probability` a gene's value is drawn afresh, uniformly over its bounds in scale
    space. `mirror=True` takes the same draws as the unmirrored call with the same `rng` state and steps the other
    way (a resampled value is mirrored across the middle of the bounds), so a pair of clones explores both sides.
    """
    sign = -1.0 if mirror else 1.0
    child = {}
    for name in sorted(genome):
        gene = genome[name]
        scale = _clamp_scale(gene, gene.mutation_scale * math.exp(META_MUTATION_RATE * rng.gauss(0.0, 1.0)))
        step = rng.gauss(0.0, 1.0)
        resample, u = rng.random() < resample_probability, rng.random()
        if resample:
            y = gene.to_space(gene.low) + (u if not mirror else 1.0 - u) * gene.width
        else:
            y = gene.to_space(gene.value) + sign * scale * step
        child[name] = dataclasses.replace(gene, value=_at(gene, y), mutation_scale=scale)
    return child


def initial_clan(base: Genome, size: int, seed: int, spread: str = "stratified", width: float = 1.0) -> list[Genome]:
    """Member 0 keeps the configured values. With `spread="stratified"` the others form a Latin hypercube over the
    bounds: for each gene, member i gets its own stratum (a random permutation per gene), at a random point inside
    it. With `spread="local"` they start one mutation step around member 0."""
    clan = [copy_genome(base) for _ in range(size)]
    others = size - 1
    for name in sorted(base):
        gene = base[name]
        rng = make_rng(seed, "initial", name)
        strata = list(range(others))
        rng.shuffle(strata)
        # The strata cover `width` of the bounds around member 0's value (shifted to stay inside them).
        span, start = width * gene.width, gene.to_space(gene.value)
        low = min(max(start - span / 2, gene.to_space(gene.low)), gene.to_space(gene.high) - span)
        for member in range(1, size):
            if spread == "stratified":
                y = low + (strata[member - 1] + rng.random()) / others * span
            else:
                y = start + gene.mutation_scale * rng.gauss(0.0, 1.0)
            clan[member][name] = dataclasses.replace(gene, value=_at(gene, y))
    return clan


def copy_genome(genome: Genome) -> Genome:
    return {name: dataclasses.replace(gene) for name, gene in genome.items()}


def consensus(genomes: list[Genome], name: str) -> float:
    """The value every member expresses for a specialized gene while the clan cooperates: the clan's mean (or
    median, as the gene says), rounded to the nearest allowed value for an integer gene."""
    gene = genomes[0][name]
    values = [genome[name].value for genome in genomes]
    value = statistics.median(values) if gene.consensus == "median" else statistics.fmean(values)
    if gene.integer:
        value = min(max(float(round(value)), gene.low), gene.high)
    return value


def soloists(genomes: list[Genome], radius: float, center: int | None = None) -> set[int]:
    """The members that train alone while the clan cooperates: those whose optimizer genes lie more than `radius` of
    a gene's bounds (in scale space) from member `center`'s (the last round's best), the farthest first, so that at
    least two members share. With no `center`, or when no other member lies within `radius` of it, the distance is
    from the clan's median instead.

    A member whose learning rate is far from the others' moves its weights at another pace, so the gradients the
    others take at their weights point it the wrong way (and its own, the others). Such a member neither adds to
    nor applies the shared gradient; the rest share among themselves. Measured from the best, the members near it
    share with it and the others leave, so its gradient is not averaged with those of members that learn at another
    pace. A best member with no neighbour would have to share with a far-off one, so then the median decides: a
    spread clan often has a far-off member on each side of it, and both leave for the members in between to share
    cleanly. Genes stay in their bounds, so no member is farther than 1: `radius=1` leaves every member sharing.
    """

    def far_from(center_of: Callable[[list[float]], float]) -> list[int]:
        distance = [0.0] * len(genomes)
        for name, gene in genomes[0].items():
            if gene.kind != OPTIMIZER:
                continue
            points = [genome[name].to_space(genome[name].value) for genome in genomes]
            middle = center_of(points)
            for member, y in enumerate(points):
                distance[member] = max(distance[member], abs(y - middle) / gene.width)
        return sorted((m for m in range(len(genomes)) if distance[m] > radius), key=lambda m: (-distance[m], m))

    if center is not None:
        far = far_from(lambda points: points[center])
        if len(far) < len(genomes) - 1:  # another member lies near the best
            return set(far[: len(genomes) - 2])
    return set(far_from(statistics.median)[: len(genomes) - 2])


def _badness(value: float, greater_is_better: bool) -> float:
    if not math.isfinite(value):
        return math.inf
    return -value if greater_is_better else value


def rank_members(fitness: list[float], greater_is_better: bool) -> list[int]:
    """Member ids from best to worst; NaN and infinite fitness rank last, ties by member id."""
    return sorted(range(len(fitness)), key=lambda m: (_badness(fitness[m], greater_is_better), m))


def selection_plan(
    fitness: list[float],
    greater_is_better: bool,
    fraction: float,
    rng: random.Random,
    batch_scores: list[list[float] | None] | None = None,
    confidence: float = 0.0,
    rank_only: bool = False,
) -> dict[int, int]:
    """Truncation selection: `{replaced member: member it clones}`.

    The bottom `fraction` of the clan (at least one member, at most half) is replaced by clones drawn from the top
    fraction of the same size, so the best member is never replaced and no clone source is itself replaced.

    With `confidence > 0` and each member's fitness per eval batch (`batch_scores`, every member's on the same
    batches), a member is replaced only when its source is better with that confidence by a one-sided paired t-test
    over the batches (`significantly_better`). With `rank_only` (a round inside the warmup, `select_in_warmup`) only
    members whose fitness is not finite are replaced. A member with a non-finite fitness is always replaced.
    """
    order = rank_members(fitness, greater_is_better)
    count = replaced_count(len(order), fraction)
    top, bottom = order[:count], order[len(order) - count :]
    plan = {dst: rng.choice(top) for dst in sorted(bottom)}  # drawn first, so the gates never shift the draws

    def replaced(dst: int, src: int) -> bool:
        if not math.isfinite(fitness[dst]):
            return True
        if rank_only:
            return False
        if confidence <= 0 or batch_scores is None:
            return True
        return significantly_better(batch_scores[src], batch_scores[dst], confidence, greater_is_better)

    return {dst: src for dst, src in plan.items() if replaced(dst, src)}


def hold_the_best(
    genomes: list[Genome],
    fitness: list[float],
    previous: list[float],
    batch_scores: list[list[float] | None] | None,
    plan: dict[int, int],
    greater_is_better: bool,
    confidence: float,
) -> tuple[dict[int, int], dict[int, int]]:
    """Holding the best, on top of a selection `plan`: `(plan, copies)`. In a round whose best fitness beats the
    previous round's (`previous`), `copies` makes one member the best beats with `confidence` its exact copy
    (`hold_copy`), unless it has one already (`copies_of_best`); in one that does not, the best's copy joins the plan
    as a mutated clone of it. The first round has nothing to beat and makes no copy: its leader has trained one round
    from the user's weights, and is often a member at a rate too high for the rest of the run."""
    if not previous:
        return plan, {}
    copies = copies_of_best(genomes, fitness, plan, greater_is_better)
    if not improved(fitness, previous, greater_is_better):
        return plan | copies, {}
    if not batch_scores or copies:
        return plan, {}
    return plan, hold_copy(fitness, batch_scores, plan, greater_is_better, confidence)


def improved(fitness: list[float], previous: list[float], greater_is_better: bool) -> bool:
    """Whether this round's best fitness beats the previous round's."""
    best = min((_badness(f, greater_is_better) for f in fitness), default=math.inf)
    return math.isfinite(best) and best < min((_badness(f, greater_is_better) for f in previous), default=math.inf)


def hold_copy(
    fitness: list[float],
    batch_scores: list[list[float] | None],
    plan: dict[int, int],
    greater_is_better: bool,
    confidence: float,
) -> dict[int, int]:
    """Holding the best: `{member: best}` for the lowest-ranked member the best beats with `confidence` by a paired
    t-test over the eval batches, left out of the plan and not a clone source (`{}` if there is none). It becomes an
    exact copy of the best (weights, optimizer state, genes unmutated): a member that shares the best's gradients and
    is identical to it makes the mean it applies less diluted by members at other rates and weights. One copy, not
    every member the best beats: more copies leave fewer members exploring, and the clan trains as one model at its
    leader's rate, which overfits sooner and holds an early leader too long (docs/search.md)."""
    best, spared = _best_and_spared(fitness, plan, greater_is_better)
    if batch_scores[best] is None or len(batch_scores[best]) < 2:
        return {}  # no test, no copy (a best that is not finite leaves no finite member below it either)
    for member in reversed(rank_members(fitness, greater_is_better)):
        if (
            member not in spared
            and math.isfinite(fitness[member])
            and batch_scores[member] is not None
            and significantly_better(batch_scores[best], batch_scores[member], confidence, greater_is_better)
        ):
            return {member: best}
    return {}


def copies_of_best(
    genomes: list[Genome], fitness: list[float], plan: dict[int, int], greater_is_better: bool
) -> dict[int, int]:
    """`{member: best}` for the members whose genes are the best's (its exact copy), left out of the plan and not a
    clone source: while there is one, no other copy is made, and in a round that did not improve it goes back to
    exploring as a mutated clone of the best."""
    best, spared = _best_and_spared(fitness, plan, greater_is_better)
    values = genome_values(genomes[best])
    return {
        member: best
        for member in range(len(genomes))
        if member not in spared and genome_values(genomes[member]) == values
    }


def _best_and_spared(fitness: list[float], plan: dict[int, int], greater_is_better: bool) -> tuple[int, set[int]]:
    """The best member, and the members holding the best leaves alone: it, and those a selection plan replaces or
    clones from."""
    best = rank_members(fitness, greater_is_better)[0]
    return best, set(plan) | set(plan.values()) | {best}


def significantly_better(
    scores: list[float] | None, others: list[float] | None, confidence: float, greater_is_better: bool
) -> bool:
    """Whether `scores` beat `others` (the same batches, in the same order) with `confidence`, by a one-sided paired
    t-test over the batches. Without two finite pairs there is no test, and the answer is yes: selection then acts
    on the mean alone, as it does with `confidence=0`."""
    if scores is None or others is None:
        return True
    sign = 1.0 if greater_is_better else -1.0
    gains = [sign * (a - b) for a, b in zip(scores, others, strict=True) if math.isfinite(a) and math.isfinite(b)]
    if len(gains) < 2:
        return True
    mean, sd = statistics.fmean(gains), statistics.stdev(gains)
    if sd == 0:
        return mean > 0
    return mean / (sd / math.sqrt(len(gains))) > t_quantile(confidence, len(gains) - 1)


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile, by the Cornish-Fisher expansion around the normal one (Abramowitz & Stegun 26.7.5):
    within 1% of the exact value for df >= 3 at p <= 0.99, which is all a selection threshold needs."""
    z = statistics.NormalDist().inv_cdf(p)
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
        + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * df**4)
    )


def replaced_count(clan_size: int, fraction: float) -> int:
    """How many members a round replaces: `fraction` of the clan, at least one and at most half."""
    return min(clan_size // 2, max(1, round(fraction * clan_size)))


def adapt_scales(
    genomes: list[Genome], last_plan: dict[int, int], fitness: list[float], greater_is_better: bool
) -> list[Genome]:
    """The 1/5th success rule on the clones of the last selection, now that they have been evaluated.

    A clone that beats its parent grows the mutation scales of both by `SUCCESS_GROWTH` (the step that found an
    improvement is worth repeating, and larger); one that does not shrinks both by `FAILURE_SHRINK`. A parent with
    several clones takes the geometric mean of their factors.
    """
    factors: dict[int, list[float]] = {}
    for child, parent in last_plan.items():
        if genome_values(genomes[child]) == genome_values(genomes[parent]):
            continue  # an exact copy (holding the best): no gene changed, so there is nothing to judge
        success = _badness(fitness[child], greater_is_better) < _badness(fitness[parent], greater_is_better)
        factor = math.log(SUCCESS_GROWTH if success else FAILURE_SHRINK)
        factors.setdefault(child, []).append(factor)
        factors.setdefault(parent, []).append(factor)
    adapted = [copy_genome(g) for g in genomes]
    for member, logs in factors.items():
        factor = math.exp(statistics.fmean(logs))
        for gene in adapted[member].values():
            gene.mutation_scale = _clamp_scale(gene, gene.mutation_scale * factor)
    return adapted


def reproduce(
    genomes: list[Genome], plan: dict[int, int], seed: int, round_index: int, search: Search = Search()
) -> list[Genome]:
    """The clan's next genomes: each replaced member gets its source's genome, mutated.

    With `search.mirrored`, the replaced members (in id order) pair up and each pair shares its random draws, the
    second stepping the other way; an odd one out mutates alone.
    """
    children = [copy_genome(g) for g in genomes]
    replaced = sorted(plan)
    for i, dst in enumerate(replaced):
        mirror = search.mirrored and i % 2 == 1
        rng = make_rng(seed, "mutate", round_index, replaced[i - 1] if mirror else dst)
        children[dst] = mutate(genomes[plan[dst]], rng, search.resample_probability, mirror=mirror)
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
