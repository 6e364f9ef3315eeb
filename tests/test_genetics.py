"""The pure genetics, in one process: genes, mutation, consensus, selection."""

import dataclasses
import math
import random

import pytest

from clantune_hf.genes import GENE_SPECS, build_gene, default_bounds, parse_gene_options
from clantune_hf.genetics import (
    FAILURE_SHRINK,
    MAX_SCALE_FRACTION,
    META_MUTATION_RATE,
    SPREADS,
    SUCCESS_GROWTH,
    Search,
    adapt_scales,
    checksum,
    consensus,
    copies_of_best,
    copy_genome,
    hold_copy,
    hold_the_best,
    improved,
    initial_clan,
    make_rng,
    mutate,
    rank_members,
    reflect,
    reproduce,
    selection_plan,
    significantly_better,
    soloists,
    t_quantile,
)
from clantune_hf.history import last_fitness, last_plan, round_records


def genome(**values):
    return {name: build_gene(name, value, {}) for name, value in values.items()}


def test_every_gene_gets_default_bounds_around_its_value():
    starts = {"learning_rate": 3e-4, "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999,
              "adam_epsilon": 1e-8, "max_grad_norm": 1.0, "dropout": 0.1, "label_smoothing_factor": 0.0,
              "gradient_accumulation_steps": 2}  # fmt: skip
    assert set(starts) == set(GENE_SPECS)
    for name, value in starts.items():
        gene = build_gene(name, value, {})
        assert gene.low <= value <= gene.high and gene.low < gene.high, name
        assert GENE_SPECS[name].contains(gene.low) and GENE_SPECS[name].contains(gene.high), name
        assert gene.mutation_scale > 0, name
    lr = build_gene("learning_rate", 3e-4, {})
    assert lr.scale == "log" and lr.high >= 10 * 3e-4 and lr.low <= 3e-4 / 10


def test_dict_options_customize_a_gene():
    options = parse_gene_options({"learning_rate": {"low": 1e-5, "high": 1e-2, "mutation_scale": 0.5}})
    gene = build_gene("learning_rate", 3e-4, options["learning_rate"])
    assert (gene.low, gene.high, gene.mutation_scale, gene.scale) == (1e-5, 1e-2, 0.5, "log")


@pytest.mark.parametrize(
    "genes, message",
    [
        (["learning_rate", "momentum"], "unknown gene 'momentum'"),
        ({"learning_rate": {"low": 1e-2, "high": 1e-3}}, "low=0.01 >= high=0.001"),
        ({"learning_rate": {"low": 1e-3, "high": 1e-3}}, "low=0.001 >= high=0.001"),
        ({"learning_rate": {"low": -1.0}}, "outside the valid domain"),
        ({"adam_beta2": {"high": 1.0}}, "outside the valid domain"),
        ({"dropout": {"hgih": 0.3}}, "unknown options"),
        ({"weight_decay": {"scale": "cubic"}}, "must be one of"),
        ([], "empty"),
    ],
)
def test_bad_genes_are_refused_with_the_field_named(genes, message):
    with pytest.raises(ValueError, match="genes") as err:
        parse_gene_options(genes)
    assert message in str(err.value)


def set_aux(trainer, value):
    trainer.aux = value


@pytest.mark.parametrize(
    "genes, message",
    [
        ({"aux": {"value": 0.5, "low": 0, "high": 1, "expression": 3}}, "must be a callable"),
        ({"aux": {"value": 0.5, "low": 0, "high": 1, "expression": ""}}, "must be a callable"),
        ({"aux": {"value": 0.5, "low": 0, "high": 1}}, "needs ['expression']"),
        ({"aux": {"low": 0, "high": 1}}, "unknown gene 'aux'"),
        ({"aux": {"value": 0.5, "low": 0, "expression": set_aux}}, "needs ['high']"),
        ({"aux": {"value": 0.5, "low": 0, "high": 1, "expression": "aux", "kind": "loss"}}, "['kind']"),
        ({"aux": {"value": 0.5, "low": 0, "high": 1, "expression": "aux", "scale": "log"}}, "outside the valid"),
        ({"aux": {"value": 0.5, "low": -1, "high": 1, "expression": "aux", "scale": "log1p"}}, "outside the valid"),
        ({"aux": {"value": 2, "low": 1.2, "high": 1.8, "expression": "aux", "integer": True}}, "fewer than two"),
        ({"aux": {"value": 2, "low": 1, "high": 4, "expression": "aux", "integer": "yes"}}, "True or False"),
        ({"aux": {"value": 2, "low": 1, "high": 4, "expression": "aux", "consensus": "mode"}}, "['consensus']"),
        ({"dropout": {"value": 0.1, "low": 0, "high": 0.5, "expression": set_aux}}, "is a built-in gene"),
        ({"gradient_accumulation_steps": {"low": 0.5}}, "outside the valid domain"),
        ({"gradient_accumulation_steps": {"low": 2.2, "high": 2.9}}, "fewer than two integers"),
    ],
)
def test_bad_custom_and_integer_genes_are_refused(genes, message):
    with pytest.raises(ValueError, match="genes") as err:
        parse_gene_options(genes)
    assert message in str(err.value)


def test_a_custom_gene_is_built_from_its_declaration():
    options = parse_gene_options({"aux": {"value": "0.5", "low": 0, "high": 2, "expression": set_aux}})["aux"]
    gene = build_gene("aux", options["value"], options)
    assert (gene.value, gene.low, gene.high, gene.scale, gene.kind) == (0.5, 0.0, 2.0, "linear", "specialized")
    steps = parse_gene_options({"k": {"value": 4, "low": 1, "high": 16, "expression": "k", "integer": True,
                                      "scale": "log", "kind": "optimizer"}})["k"]  # fmt: skip
    gene = build_gene("k", steps["value"], steps)
    assert gene.integer and gene.kind == "optimizer" and gene.mutation_scale >= gene.unit == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="of integers"):
        build_gene("k", 2.5, steps)
    with pytest.raises(ValueError, match="lies outside its bounds"):
        build_gene("aux", 3.0, options)


def test_integer_genes_stay_integers_in_bounds_and_never_stick():
    clan = initial_clan(genome(gradient_accumulation_steps=2), 8, seed=0)
    values = [g["gradient_accumulation_steps"].value for g in clan]
    assert all(v == round(v) and 1 <= v <= 8 for v in values) and len(set(values)) >= 3, values
    gene = clan[0]["gradient_accumulation_steps"]
    assert (gene.low, gene.high) == (1.0, 8.0)
    # After many failures the scale has shrunk to its floor, which still moves the value; it can also grow past a step.
    stuck = {"gradient_accumulation_steps": dataclasses.replace(gene, mutation_scale=1e-9)}
    moved = 0
    for i in range(200):
        child = mutate(stuck, make_rng(0, "int", i))["gradient_accumulation_steps"]
        assert child.value == round(child.value) and 1 <= child.value <= 8
        assert child.mutation_scale >= gene.unit / 2
        moved += child.value != gene.value
    assert moved >= 20, moved
    grown = adapt_scales([{**stuck}], {}, [0.0], False)
    for _ in range(30):
        parent = grown[0]["gradient_accumulation_steps"]
        clone = {"gradient_accumulation_steps": dataclasses.replace(parent, value=3.0)}  # a clone that moved
        grown = adapt_scales(grown + [clone], {1: 0}, [1.0, 0.5], False)[:1]
    assert grown[0]["gradient_accumulation_steps"].mutation_scale > gene.unit


def test_consensus_follows_the_gene_rule_and_rounds_integers():
    options = parse_gene_options({"gradient_accumulation_steps": {"consensus": "median", "high": 16}})
    clan = []
    for value in (1, 2, 2, 16):
        clan.append({"gradient_accumulation_steps": build_gene("gradient_accumulation_steps", value,
                                                               options["gradient_accumulation_steps"])})  # fmt: skip
    assert consensus(clan, "gradient_accumulation_steps") == 2.0  # the median; the mean would be 5.25 -> 5
    for genome_ in clan:
        genome_["gradient_accumulation_steps"].consensus = "mean"
    assert consensus(clan, "gradient_accumulation_steps") == 5.0


def test_starting_value_outside_custom_bounds_is_refused():
    with pytest.raises(ValueError, match="lies outside its bounds"):
        build_gene("learning_rate", 3e-4, {"low": 1e-3, "high": 1e-2})


def test_reflect_folds_into_bounds_and_leaves_a_bound():
    assert reflect(0.5, 0.0, 1.0) == 0.5
    assert reflect(-0.2, 0.0, 1.0) == pytest.approx(0.2)
    assert reflect(1.3, 0.0, 1.0) == pytest.approx(0.7)
    assert reflect(2.4, 0.0, 1.0) == pytest.approx(0.4)
    # a gene sitting on its low bound (weight decay 0) moves away from it under mutation
    wd = genome(weight_decay=0.0)
    values = [mutate(wd, random.Random(seed))["weight_decay"].value for seed in range(20)]
    assert all(0.0 <= v <= wd["weight_decay"].high for v in values)
    assert sum(v > 0 for v in values) >= 18


def test_mutation_scale_mutates_first_then_value_with_the_new_scale():
    parent = genome(learning_rate=1e-3, dropout=0.1)
    child = mutate(parent, random.Random(7))
    # Genes in sorted order (dropout, then learning_rate); per gene: the scale's draw, the step's draw, then the
    # resampling coin and point (unused without resampling).
    expected = random.Random(7)
    for name in ("dropout", "learning_rate"):
        gene = parent[name]
        scale = gene.mutation_scale * math.exp(META_MUTATION_RATE * expected.gauss(0.0, 1.0))
        value = gene.from_space(
            reflect(gene.to_space(gene.value) + scale * expected.gauss(0.0, 1.0), gene.to_space(gene.low),
                    gene.to_space(gene.high))
        )  # fmt: skip
        expected.random(), expected.random()
        assert child[name].mutation_scale == pytest.approx(scale, rel=1e-12), name
        assert child[name].value == pytest.approx(value, rel=1e-12), name
        assert gene.low <= child[name].value <= gene.high
    assert parent["learning_rate"].value == 1e-3, "mutate must not change its input"


def test_mirrored_mutation_steps_the_other_way_with_the_same_scale():
    parent = genome(learning_rate=1e-3, weight_decay=0.05)
    for seed in range(20):
        child, mirror = mutate(parent, random.Random(seed)), mutate(parent, random.Random(seed), mirror=True)
        lr = parent["learning_rate"]
        up, down = (lr.to_space(c["learning_rate"].value) - lr.to_space(lr.value) for c in (child, mirror))
        assert up == pytest.approx(-down, abs=1e-9), seed  # 1e-3 sits mid-bounds: no reflection
        assert child["learning_rate"].mutation_scale == mirror["learning_rate"].mutation_scale


def test_resampling_draws_from_the_whole_bounds():
    parent = genome(learning_rate=1e-3)
    lr = parent["learning_rate"]
    values = [
        mutate(parent, random.Random(seed), resample_probability=1.0)["learning_rate"].value for seed in range(400)
    ]
    # Uniform in log space over [1e-5, 1e-1]: each decade holds about a quarter of the draws.
    decades = [sum(10 ** (k - 5) <= v < 10 ** (k - 4) for v in values) for k in range(4)]
    assert all(60 <= d <= 140 for d in decades), decades
    assert all(lr.low <= v <= lr.high for v in values)
    assert mutate(parent, random.Random(0), resample_probability=0.0) == mutate(parent, random.Random(0))


def test_success_rule_grows_scales_on_success_and_shrinks_them_on_failure():
    clan = [genome(learning_rate=lr, weight_decay=0.01) for lr in (1e-3, 2e-3, 3e-3, 4e-3)]
    start = clan[0]["learning_rate"].mutation_scale
    # Member 3 is a clone of member 0; member 2 a clone of member 1. Lower fitness is better.
    fitness = [0.5, 0.4, 0.6, 0.3]  # 3 beats its parent 0; 2 loses to its parent 1
    adapted = adapt_scales(clan, {3: 0, 2: 1}, fitness, greater_is_better=False)
    for member in (0, 3):
        assert adapted[member]["learning_rate"].mutation_scale == pytest.approx(start * SUCCESS_GROWTH)
    for member in (1, 2):
        assert adapted[member]["learning_rate"].mutation_scale == pytest.approx(start * FAILURE_SHRINK)
    assert clan[0]["learning_rate"].mutation_scale == start, "adapt_scales must not change its input"
    # Repeated success grows a scale up to its cap; repeated failure shrinks it to its floor, 4x more slowly.
    grown, shrunk = clan, clan
    for _ in range(40):
        grown = adapt_scales(grown, {3: 0}, [0.5, 0.5, 0.5, 0.1], greater_is_better=False)
        shrunk = adapt_scales(shrunk, {3: 0}, [0.1, 0.5, 0.5, 0.5], greater_is_better=False)
    lr = clan[0]["learning_rate"]
    assert grown[3]["learning_rate"].mutation_scale == pytest.approx(MAX_SCALE_FRACTION * lr.width)
    assert start * FAILURE_SHRINK**40 == pytest.approx(shrunk[3]["learning_rate"].mutation_scale)
    assert math.log(SUCCESS_GROWTH) == pytest.approx(-4 * math.log(FAILURE_SHRINK)), "stationary at 1/5 success"
    # NaN never succeeds; higher is better when greater_is_better.
    failed = adapt_scales(clan, {3: 0}, [0.5, 0.5, 0.5, math.nan], greater_is_better=False)
    assert failed[3]["learning_rate"].mutation_scale < start
    won = adapt_scales(clan, {3: 0}, [0.5, 0.5, 0.5, 0.9], greater_is_better=True)
    assert won[3]["learning_rate"].mutation_scale > start


def test_success_rule_does_not_judge_an_exact_copy():
    """A member made an exact copy of the best (holding the best) changed no gene: winning or losing its next round
    says nothing about a step size, so neither its scales nor its parent's move."""
    clan = [genome(learning_rate=lr) for lr in (1e-3, 2e-3, 3e-3)]
    clan[2] = copy_genome(clan[0])
    adapted = adapt_scales(clan, {2: 0, 1: 0}, [0.5, 0.4, 0.3], greater_is_better=False)
    start = clan[0]["learning_rate"].mutation_scale
    assert adapted[2]["learning_rate"].mutation_scale == start, "the copy is not judged"
    assert adapted[1]["learning_rate"].mutation_scale == pytest.approx(start * SUCCESS_GROWTH), "the clone is"
    assert adapted[0]["learning_rate"].mutation_scale == pytest.approx(start * SUCCESS_GROWTH)


def test_improved_compares_the_best_with_the_previous_rounds_best():
    assert improved([0.5, 0.3], [0.4, 0.35], greater_is_better=False)
    assert not improved([0.5, 0.35], [0.4, 0.35], greater_is_better=False), "a tie is no improvement"
    assert improved([0.5, 0.9], [0.8, 0.7], greater_is_better=True)
    assert not improved([0.5, 0.6], [0.8, 0.7], greater_is_better=True)
    assert improved([math.nan, 0.3], [0.4, math.inf], greater_is_better=False), "non-finite members are ignored"
    assert not improved([math.nan, math.nan], [0.4], greater_is_better=False)


def test_hold_copy_is_the_lowest_member_the_best_beats_significantly_and_selection_spares():
    base = [1.0, 1.4, 0.8, 1.2, 0.9, 1.1, 1.3, 0.7]
    worse = [b + 0.2 for b in base]  # consistently worse than the best
    noise = [b + d for b, d in zip(base, [0.3, -0.25, 0.3, -0.25, 0.3, -0.25, 0.3, -0.25], strict=True)]
    scores = [base, worse, noise, [b + 0.3 for b in base], [b + 0.25 for b in base]]
    fitness = [sum(s) / len(s) for s in scores]  # ranked 0, 2, 1, 4, 3
    plan = {3: 0}  # selection replaces member 3 with a clone of the best
    assert hold_copy(fitness, scores, plan, False, 0.99) == {4: 0}, "the lowest the plan leaves, beaten throughout"
    assert hold_copy(fitness, scores, {3: 4}, False, 0.99) == {1: 0}, "a clone source is spared"
    assert hold_copy(fitness, scores, {3: 4, 1: 0}, False, 0.99) == {}, "the noisy member is not beaten"
    fitness[4], scores[4] = math.nan, None
    assert hold_copy(fitness, scores, plan, False, 0.99) == {1: 0}, "a non-finite member is selection's"
    # Higher is better for a metric; without two batches there is no test and no copy.
    assert hold_copy([0.9, 0.7], [[0.9, 0.9, 0.8], [0.7, 0.7, 0.6]], {}, True, 0.9) == {1: 0}
    assert hold_copy([0.9, 0.7], [[0.9], [0.7]], {}, True, 0.9) == {}


def test_copies_of_best_are_the_members_with_the_best_members_genes():
    best = genome(learning_rate=1e-3, weight_decay=0.01)
    clan = [genome(learning_rate=2e-3, weight_decay=0.01), copy_genome(best), copy_genome(best), copy_genome(best)]
    fitness = [0.5, 0.4, 0.4, 0.4]  # member 1 is the best (ties by id), 2 and 3 its exact copies
    assert copies_of_best(clan, fitness, {0: 1}, greater_is_better=False) == {2: 1, 3: 1}
    assert copies_of_best(clan, fitness, {3: 1}, greater_is_better=False) == {2: 1}, "the plan's are its own"
    clan[2] = genome(learning_rate=1e-3, weight_decay=0.02)
    assert copies_of_best(clan, fitness, {}, greater_is_better=False) == {3: 1}


def test_hold_the_best_keeps_one_copy_while_the_clan_improves_and_releases_it_when_it_does_not():
    best = genome(learning_rate=1e-3)
    clan = [copy_genome(best), genome(learning_rate=2e-3), genome(learning_rate=3e-3), genome(learning_rate=4e-3)]
    scores = [[0.1 * m + d for d in (0.0, 0.2, 0.1)] for m in range(4)]  # member 0 leads on every batch
    fitness = [sum(s) / 3 for s in scores]
    history = round_records(0, 10, [f + 1 for f in fitness], clan, {})
    plan = {3: 0}
    assert hold_the_best(clan, fitness, last_fitness(history), scores, plan, False, 0.99) == (plan, {2: 0})
    assert hold_the_best(clan, fitness, [], scores, plan, False, 0.99) == (plan, {}), "the first round beats nothing"
    previous = last_fitness(history)
    assert hold_the_best(clan, fitness, previous, None, plan, False, 0.99) == (plan, {}), "no scores, no copy"
    clan[1] = copy_genome(best)
    assert hold_the_best(clan, fitness, previous, scores, plan, False, 0.99) == (plan, {}), "the best has its copy"
    assert hold_the_best(clan, fitness, [], scores, plan, False, 0.99) == (plan, {}), "nor releases one"
    # No improvement on the last round: member 1, whose genes are the best's, explores again; nothing is copied.
    stalled = [f - 1 for f in fitness]
    assert hold_the_best(clan, fitness, stalled, scores, plan, False, 0.99) == ({3: 0, 1: 0}, {})
    assert last_fitness(history) == [f + 1 for f in fitness] and last_fitness([]) == []


def test_success_rule_lets_a_lineage_cross_decades_where_self_adaptation_stalls():
    """A 1+1 lineage on a one-gene problem whose optimum lies 100x above the start: the success rule reaches it,
    self-adaptation alone under elitism does not within the same rounds."""

    def lineage(control: str, seed: int) -> float:
        clan = initial_clan(genome(learning_rate=1e-4), 2, seed, spread="local")
        clan[1] = copy_genome(clan[0])
        loss = lambda g: abs(math.log10(g["learning_rate"].value) + 2)  # noqa: E731 - the optimum is 1e-2
        plan: dict[int, int] = {}
        for round_index in range(20):
            fitness = [loss(g) for g in clan]
            if control == "success":
                clan = adapt_scales(clan, plan, fitness, greater_is_better=False)
            plan = selection_plan(fitness, False, 0.5, make_rng(seed, "select", round_index))
            clan = reproduce(clan, plan, seed, round_index, Search(resample_probability=0.0))
        return min(loss(g) for g in clan)

    success = [lineage("success", seed) for seed in range(10)]
    self_adaptive = [lineage("self_adaptive", seed) for seed in range(10)]
    assert sum(success) < 0.5 * sum(self_adaptive), (success, self_adaptive)


def test_mutation_scale_is_clamped_to_the_bounds():
    gene = genome(dropout=0.1)
    gene["dropout"].mutation_scale = 100.0
    child = mutate(gene, random.Random(0))
    assert child["dropout"].mutation_scale <= 0.25 * gene["dropout"].width


def test_initial_clan_keeps_the_base_and_spreads_the_rest():
    base = genome(learning_rate=1e-3, weight_decay=0.0)
    for spread in SPREADS:
        clan = initial_clan(base, 4, seed=42, spread=spread)
        assert clan[0] == base, spread
        assert len({g["learning_rate"].value for g in clan}) == 4, spread
        assert clan == initial_clan(base, 4, seed=42, spread=spread), "every rank derives the same initial clan"
        assert clan != initial_clan(base, 4, seed=43, spread=spread)


@pytest.mark.parametrize("size", [2, 4, 8])
def test_stratified_spread_covers_the_bounds_one_stratum_per_member(size):
    base = genome(learning_rate=1e-3, weight_decay=0.01, dropout=0.1)
    for seed in range(5):
        clan = initial_clan(base, size, seed=seed, spread="stratified")
        for name, gene in base.items():
            low, width = gene.to_space(gene.low), gene.width
            quantiles = [(gene.to_space(g[name].value) - low) / width for g in clan[1:]]
            strata = sorted(min(int(q * (size - 1)), size - 2) for q in quantiles)
            assert strata == list(range(size - 1)), (name, seed, quantiles)
    # the local spread stays near the start
    local = initial_clan(base, 8, seed=0, spread="local")
    assert all(abs(math.log(g["learning_rate"].value / 1e-3)) < 5 * 0.3 for g in local)


def test_a_narrower_spread_covers_its_part_of_the_bounds_around_the_start():
    base = genome(learning_rate=1e-3, weight_decay=0.0)
    clan = initial_clan(base, 8, seed=0, spread="stratified", width=0.5)
    lrs = [g["learning_rate"].value for g in clan[1:]]
    # The learning rate's bounds are /100 .. x100 around 1e-3; half of them in log space is /10 .. x10.
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs) and max(lrs) / min(lrs) > 10, lrs
    # weight decay starts on its low bound: the covered half is shifted to stay inside, [0, half the bounds].
    wds = [g["weight_decay"].value for g in clan[1:]]
    assert all(0 <= wd <= base["weight_decay"].high / 2 + 1e-12 for wd in wds), wds


def test_weight_decay_is_log1p_scaled_so_it_spreads_over_decades_and_reaches_zero():
    gene = build_gene("weight_decay", 10.0, {"high": 20.0})
    assert gene.scale == "log1p" and gene.low == 0.0 and gene.to_space(0.0) == 0.0
    for x in (0.0, 1e-4, 0.02, 0.5, 10.0, 20.0):
        assert gene.from_space(gene.to_space(x)) == pytest.approx(x, rel=1e-9, abs=1e-15)
    # Well above a thousandth of the high bound, equal steps in scale space are equal ratios, as for a log gene.
    decades = [gene.to_space(hi) - gene.to_space(hi / 10) for hi in (20.0, 2.0)]
    assert decades[0] == pytest.approx(decades[1], rel=0.05), decades
    # Started at 10, three members take one decade each: [0, 0.18], [0.18, 2], [2, 20]. A linear spread would put
    # the lowest in [0, 6.7].
    for seed in range(5):
        values = sorted(g["weight_decay"].value for g in initial_clan({"weight_decay": gene}, 4, seed=seed)[1:])
        assert values[0] < 0.2 < values[1] < 2.0 < values[2], values
    # A member at 0 can mutate away from it, and stays in bounds.
    at_zero = dataclasses.replace(gene, value=0.0)
    moved = [mutate({"weight_decay": at_zero}, random.Random(seed))["weight_decay"].value for seed in range(20)]
    assert all(0.0 <= v <= 20.0 for v in moved) and any(v > 0.0 for v in moved), moved


def test_consensus_is_the_clan_mean():
    clan = [genome(dropout=p) for p in (0.0, 0.1, 0.2, 0.5)]
    assert consensus(clan, "dropout") == pytest.approx(0.2)


def test_ranking_puts_nan_and_inf_last():
    assert rank_members([0.5, math.nan, 0.2, math.inf], greater_is_better=False) == [2, 0, 1, 3]
    assert rank_members([0.5, math.nan, 0.2, -math.inf], greater_is_better=True) == [0, 2, 1, 3]


def test_selection_plan_replaces_the_bottom_with_the_top_and_spares_the_best():
    fitness = [0.9, 0.1, 0.5, math.nan, 0.3, 0.8, 0.7, 0.2]
    for seed in range(50):
        plan = selection_plan(fitness, greater_is_better=False, fraction=0.25, rng=make_rng(seed, "select", 0))
        assert sorted(plan) == [0, 3], "NaN and the worst are replaced"
        assert set(plan.values()) <= {1, 7}, "sources come from the top quarter"
    assert selection_plan([1.0, 2.0], False, 0.25, random.Random(0)) == {1: 0}, "a clan of two replaces one"
    plan = selection_plan([1.0, 2.0, 3.0], False, 0.5, random.Random(0))
    assert plan == {2: 0}, "never more than half, never the best"


def lr_clan(*lrs: float) -> list:
    """A clan whose members differ only in their learning rate (dropout 0.1 for all: a specialized gene)."""
    return [genome(learning_rate=lr, dropout=0.1) for lr in lrs]


def test_soloists_are_the_members_far_from_the_clan_median_in_optimizer_genes():
    # Default bounds lr/100 .. lr*100 around 1e-3: four decades, so a radius of 0.25 is one decade.
    assert soloists(lr_clan(1e-3, 1.2e-3, 0.9e-3, 1.1e-3), 0.25) == set(), "members within 10x all share"
    assert soloists(lr_clan(1e-3, 1.2e-3, 0.9e-3, 5e-2), 0.25) == {3}
    assert soloists(lr_clan(1e-3, 1.2e-3, 0.9e-3, 5e-2), 1.0) == set(), "a radius of 1 lets every member share"
    # Even a member a whole width (four decades) from the median: no gene is farther than its bounds.
    a_width_off = lr_clan(1e-5, 1e-5, 1e-5, 1e-1)
    assert soloists(a_width_off, 1.0) == set()
    assert soloists(a_width_off, 0.99) == {3}
    # Far on both sides: the farthest first, and at least two members always share.
    far_both = lr_clan(1e-3, 1.2e-3, 2e-5, 5e-2, 1.1e-3, 1e-1)
    assert soloists(far_both, 0.25) == {2, 3, 5}
    assert len(soloists(lr_clan(1e-5, 1e-3, 1e-1), 0.25)) <= 1 and soloists(lr_clan(1e-5, 1e-1), 0.25) == set()
    # Specialized genes (dropout) never send a member alone: it shares gradients whatever its dropout.
    spread = [genome(learning_rate=1e-3, dropout=d) for d in (0.0, 0.1, 0.1, 0.9)]
    assert soloists(spread, 0.25) == set()


def test_soloists_are_measured_from_the_best_member_when_another_is_near_it():
    near_and_far = lr_clan(1e-3, 1.2e-3, 5e-2, 6e-2)
    assert soloists(near_and_far, 0.25) == set(), "from the median (about 8e-3) no member is a decade off"
    assert soloists(near_and_far, 0.25, center=0) == {2, 3}, "the best shares with its neighbour only"
    assert soloists(near_and_far, 0.25, center=3) == {0, 1}
    # A best member with no neighbour within the radius: the median decides, so the far-off leader trains alone
    # rather than sharing with a member 10x from it.
    lone_leader = lr_clan(1e-3, 1.2e-3, 0.9e-3, 5e-2)
    assert soloists(lone_leader, 0.25, center=3) == soloists(lone_leader, 0.25) == {3}
    # At least two members share, the farthest from the best leave first.
    assert soloists(lr_clan(1e-3, 1e-1, 2e-5, 1.1e-3, 3e-2), 0.25, center=0) == {1, 2, 4}
    assert soloists(lr_clan(1e-3, 1e-1, 2e-5, 1.1e-3, 1.2e-3), 0.25, center=0) == {1, 2}
    assert soloists(lr_clan(1e-3, 1e-1, 2e-5), 0.25, center=0) == {1}
    assert soloists(lr_clan(1e-5, 1e-1), 0.25, center=1) == set()


@pytest.mark.parametrize(
    "p, df, exact",  # Student's t quantiles from the tables
    [(0.75, 7, 0.711), (0.9, 3, 1.638), (0.9, 7, 1.415), (0.95, 7, 1.895), (0.95, 30, 1.697), (0.99, 7, 2.998)],
)
def test_t_quantile_matches_the_tables(p, df, exact):
    assert t_quantile(p, df) == pytest.approx(exact, rel=2e-3)


def test_paired_test_needs_a_consistent_margin_over_the_batches():
    base = [1.0, 1.4, 0.8, 1.2, 0.9, 1.1, 1.3, 0.7]
    # Better on every batch by a little: the batch-to-batch spread cancels in the pairs.
    consistent = [b - 0.01 for b in base]
    assert significantly_better(consistent, base, 0.9, greater_is_better=False)
    assert not significantly_better(base, consistent, 0.9, greater_is_better=False), "one-sided"
    # A larger mean margin that flips sign from batch to batch is noise.
    noisy = [b + d for b, d in zip(base, [-0.3, 0.25, -0.3, 0.25, -0.3, 0.25, -0.3, 0.25], strict=True)]
    assert sum(noisy) < sum(base)
    assert not significantly_better(noisy, base, 0.9, greater_is_better=False)
    assert significantly_better(noisy, base, 0.1, greater_is_better=False), "a low confidence lets it through"
    # Higher is better for a metric.
    assert significantly_better(base, consistent, 0.9, greater_is_better=True)
    # No test without two finite pairs: selection falls back to the means.
    assert significantly_better([0.5], [0.6], 0.9, greater_is_better=False)
    assert significantly_better(None, base, 0.9, greater_is_better=False)
    assert significantly_better([1.0, math.nan, 2.0], [1.0, 1.0, math.nan], 0.9, greater_is_better=False)


def test_gated_selection_keeps_members_that_are_not_significantly_worse():
    base = [1.0, 1.4, 0.8, 1.2, 0.9, 1.1, 1.3, 0.7]
    clearly_worse = [b + 0.2 for b in base]
    noise = [b + d for b, d in zip(base, [0.3, -0.25, 0.3, -0.25, 0.3, -0.25, 0.3, -0.25], strict=True)]
    scores = [base, base, clearly_worse, noise]
    fitness = [sum(s) / len(s) for s in scores]
    ungated = selection_plan(fitness, False, 0.5, make_rng(0, "select", 0))
    assert sorted(ungated) == [2, 3]
    gated = selection_plan(fitness, False, 0.5, make_rng(0, "select", 0), batch_scores=scores, confidence=0.9)
    assert gated == {2: ungated[2]}, "the same draws, minus the member only noise puts at the bottom"
    # A member with a non-finite fitness is replaced whatever its scores say.
    fitness[3], scores[3] = math.nan, None
    assert sorted(selection_plan(fitness, False, 0.5, make_rng(0, "select", 0), scores, 0.9)) == [2, 3]
    assert selection_plan(fitness, False, 0.5, make_rng(0, "select", 0), scores, 0.0) == ungated


def test_a_rank_only_round_replaces_only_non_finite_members():
    """A round inside the warmup (`select_in_warmup=False`) ranks without cloning: only a member whose fitness is not
    finite is replaced, by the clone the ordinary plan draws for it, gated or not."""
    fitness = [0.4, 0.2, 0.9, 0.1]
    ordinary = selection_plan(fitness, False, 0.5, make_rng(0, "select", 0))
    assert sorted(ordinary) == [0, 2]
    assert selection_plan(fitness, False, 0.5, make_rng(0, "select", 0), rank_only=True) == {}
    fitness[2] = math.nan
    plan = selection_plan(fitness, False, 0.5, make_rng(0, "select", 0), rank_only=True)
    assert plan == {2: selection_plan(fitness, False, 0.5, make_rng(0, "select", 0))[2]}
    scores = [[0.4, 0.4], [0.2, 0.2], None, [0.1, 0.1]]
    assert selection_plan(fitness, False, 0.5, make_rng(0, "select", 0), scores, 0.9, rank_only=True) == plan


def test_selection_plan_is_the_same_on_every_rank():
    fitness = [0.4, 0.2, 0.9, 0.1]
    plans = {tuple(selection_plan(fitness, False, 0.5, make_rng(3, "select", 5)).items()) for _ in range(8)}
    assert len(plans) == 1


def test_reproduce_clones_then_mutates_only_the_replaced():
    clan = initial_clan(genome(learning_rate=1e-3, weight_decay=0.01), 4, seed=0)
    search = Search(resample_probability=0.25)
    children = reproduce(clan, {3: 1}, seed=0, round_index=2, search=search)
    assert children[:3] == clan[:3]
    assert children[3] == mutate(clan[1], make_rng(0, "mutate", 2, 3), 0.25)
    assert children[3] != clan[1]
    assert checksum(children, {}) != checksum(clan, {})
    assert checksum(clan, {3: 1}) != checksum(clan, {3: 0})


def test_reproduce_mirrors_pairs_of_clones():
    clan = initial_clan(genome(learning_rate=1e-3), 4, seed=0)
    children = reproduce(clan, {2: 0, 3: 0}, seed=0, round_index=1, search=Search(resample_probability=0.0))
    assert children[2] == mutate(clan[0], make_rng(0, "mutate", 1, 2))
    assert children[3] == mutate(clan[0], make_rng(0, "mutate", 1, 2), mirror=True)
    unmirrored = reproduce(clan, {2: 0, 3: 0}, 0, 1, Search(resample_probability=0.0, mirrored=False))
    assert unmirrored[3] == mutate(clan[0], make_rng(0, "mutate", 1, 3))


def test_last_plan_reads_the_latest_selection_from_the_history():
    clan = [genome(learning_rate=1e-3) for _ in range(4)]
    history = round_records(0, 10, [0.1, 0.2, 0.3, 0.4], clan, {3: 0})
    assert last_plan(history) == {3: 0}
    history += round_records(1, 20, [0.1, 0.2, 0.3, 0.4], clan, {2: 1, 3: 0})
    assert last_plan(history) == {2: 1, 3: 0}
    assert last_plan([]) == {}


def test_default_bounds_cover_a_tenfold_error():
    low, high = default_bounds("learning_rate", 1e-4)
    assert low <= 1e-5 and high >= 1e-3
