"""The pure genetics, in one process: genes, mutation, consensus, selection."""

import math
import random

import pytest

from clantune_hf.genes import GENE_SPECS, build_gene, default_bounds, parse_gene_options
from clantune_hf.genetics import (
    META_MUTATION_RATE,
    checksum,
    consensus,
    initial_clan,
    make_rng,
    mutate,
    rank_members,
    reflect,
    reproduce,
    selection_plan,
)


def genome(**values):
    return {name: build_gene(name, value, {}) for name, value in values.items()}


def test_every_gene_gets_default_bounds_around_its_value():
    starts = {"learning_rate": 3e-4, "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999,
              "adam_epsilon": 1e-8, "max_grad_norm": 1.0, "dropout": 0.1, "label_smoothing_factor": 0.0}  # fmt: skip
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
    expected = random.Random(7)  # genes in sorted order: dropout, then learning_rate; scale draw, then value draw
    for name in ("dropout", "learning_rate"):
        gene = parent[name]
        scale = gene.mutation_scale * math.exp(META_MUTATION_RATE * expected.gauss(0.0, 1.0))
        value = gene.from_space(
            reflect(gene.to_space(gene.value) + scale * expected.gauss(0.0, 1.0), gene.to_space(gene.low),
                    gene.to_space(gene.high))
        )  # fmt: skip
        assert child[name].mutation_scale == pytest.approx(scale, rel=1e-12), name
        assert child[name].value == pytest.approx(value, rel=1e-12), name
        assert gene.low <= child[name].value <= gene.high
    assert parent["learning_rate"].value == 1e-3, "mutate must not change its input"


def test_mutation_scale_is_clamped_to_the_bounds():
    gene = genome(dropout=0.1)
    gene["dropout"].mutation_scale = 100.0
    child = mutate(gene, random.Random(0))
    assert child["dropout"].mutation_scale <= 0.25 * gene["dropout"].width


def test_initial_clan_keeps_the_base_and_spreads_the_rest():
    base = genome(learning_rate=1e-3, weight_decay=0.0)
    clan = initial_clan(base, 4, seed=42)
    assert clan[0]["learning_rate"].value == 1e-3 and clan[0]["weight_decay"].value == 0.0
    assert len({g["learning_rate"].value for g in clan}) == 4
    assert clan == initial_clan(base, 4, seed=42), "every rank derives the same initial clan"
    assert clan != initial_clan(base, 4, seed=43)


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


def test_selection_plan_is_the_same_on_every_rank():
    fitness = [0.4, 0.2, 0.9, 0.1]
    plans = {tuple(selection_plan(fitness, False, 0.5, make_rng(3, "select", 5)).items()) for _ in range(8)}
    assert len(plans) == 1


def test_reproduce_clones_then_mutates_only_the_replaced():
    clan = initial_clan(genome(learning_rate=1e-3, weight_decay=0.01), 4, seed=0)
    children = reproduce(clan, {3: 1}, seed=0, round_index=2)
    assert children[:3] == clan[:3]
    assert children[3] == mutate(clan[1], make_rng(0, "mutate", 2, 3))
    assert children[3] != clan[1]
    assert checksum(children, {}) != checksum(clan, {})
    assert checksum(clan, {3: 1}) != checksum(clan, {3: 0})


def test_default_bounds_cover_a_tenfold_error():
    low, high = default_bounds("learning_rate", 1e-4)
    assert low <= 1e-5 and high >= 1e-3
