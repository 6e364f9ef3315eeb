"""Checks of a clan's round across real CPU ranks. Each `check_*` runs on every rank (see `run_clan`) and asserts.

Each check compares against a reference computed on the spot: the gradient a plain all-reduce gives, the batch
rank 0 drew, the source member's state before it was cloned.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import pytest
import torch
import torch.distributed as dist
from testing_utils import PatternDataset, tiny_gpt2
from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments

from clantune_hf import ClanConfig, ClanTrainer
from clantune_hf.dropout import dropout_sites
from clantune_hf.exchange import member_tensors
from clantune_hf.genetics import genome_values, make_rng, mutate
from clantune_hf.model_card import model_card_body
from clantune_hf.rounds import round_index as current_round


def gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def member_state(trainer: ClanTrainer) -> dict[str, torch.Tensor]:
    """Trainable weights, buffers and optimizer state of this member, as CPU copies."""
    state = {f"model.{n}": t.detach().cpu().clone() for n, t in member_tensors(trainer.model)}
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    for param, entries in trainer.optimizer.state.items():
        for key, value in entries.items():
            state[f"optim.{names[id(param)]}.{key}"] = value.detach().cpu().clone()
    for i, mean in enumerate(trainer._average.mean or []):  # the fitness weight average, when it holds any
        state[f"average.{i}"] = mean.detach().cpu().clone()
    return state


def make_trainer(output_dir, trainer_cls=ClanTrainer, model=None, **kwargs) -> ClanTrainer:
    defaults = dict(round_steps=4, duty_cycle=0.25, max_steps=8, learning_rate=3e-3, per_device_train_batch_size=4,
                    per_device_eval_batch_size=8, report_to="none", disable_tqdm=True, logging_steps=100,
                    genes=["learning_rate", "weight_decay", "adam_beta2", "max_grad_norm"], seed=1)  # fmt: skip
    defaults.update(kwargs)
    args = ClanConfig(output_dir=output_dir, **defaults)
    return trainer_cls(
        model=model if model is not None else tiny_gpt2(dropout=0.0),
        args=args,
        train_dataset=PatternDataset(256),
        eval_dataset=PatternDataset(24, seed=1),
    )


class RecordingTrainer(ClanTrainer):
    """Records, for every micro-step: the phase, a hash of the batch, the dropout in force, and whether the
    gradient after the step equals the reference (the all-reduced local gradient when cooperating, the local
    gradient when competing)."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        inputs = self._prepare_inputs(inputs)
        params = [p for p in self.model.parameters() if p.requires_grad]
        # Reference gradient of this member's own loss on this batch, computed on the unwrapped model with the
        # same dropout masks (the RNG is rewound before the real step).
        rng = torch.get_rng_state()
        self.model.train()
        loss = self.compute_loss(self.model, dict(inputs), num_items_in_batch=num_items_in_batch)
        local = torch.autograd.grad(loss, params, allow_unused=True)
        local = [torch.zeros_like(p) if g is None else g for g, p in zip(local, params, strict=True)]
        # What the clan shares: every member's gradient, or with soloists (solo_radius) the sharers' alone.
        reduced = [torch.zeros_like(g) if self._sharing.alone else g.clone() for g in local]
        sharers = torch.tensor(0.0 if self._sharing.alone else 1.0)  # counted here, not read from the trainer
        dist.all_reduce(sharers)
        for g in reduced:
            dist.all_reduce(g)
            g.div_(sharers)
        torch.set_rng_state(rng)
        out = super().training_step(model, inputs, num_items_in_batch)
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        self.steps.append(
            {
                "step": self.state.global_step,
                "competitive": self._competitive,
                "batch": digest([inputs["input_ids"]]),
                "dropout": sorted({round(getattr(m, n), 12) for m, n in dropout_sites(self.model)}),
                "equals_reduced": all(
                    torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads, reduced, strict=True)
                ),
                "equals_local": all(
                    torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads, local, strict=True)
                ),
                "lr": [g["lr"] for g in self.optimizer.param_groups],
                "alone": self._sharing.alone,
            }
        )
        return out


def check_cooperative(output_dir):
    """All-cooperative rounds: the gradient is the all-reduced one (a soloist's own); members with other lr genes drift
    apart."""
    trainer = make_trainer(output_dir, RecordingTrainer, duty_cycle=0.0, round_steps=6, max_steps=6)
    trainer.steps = []
    weights_at_start = digest(p for _, p in member_tensors(trainer.model))
    assert len(set(gather(weights_at_start))) == 1, "members start from identical weights"
    lr_genes = gather(trainer.genomes[trainer.member]["learning_rate"].value)
    assert len(set(lr_genes)) == trainer.clan_size, f"initial lr genes should differ: {lr_genes}"

    original_end_round = trainer._final_round
    weights = {}

    def record_then_final_round():
        weights["end"] = digest(p for _, p in member_tensors(trainer.model))
        original_end_round()

    trainer._final_round = record_then_final_round
    trainer.train()

    assert all(not s["competitive"] for s in trainer.steps)
    # The shared gradient, or a soloist's own (solo_radius: the initial spread may put a member far off).
    shared = [s["equals_local"] if s["alone"] else s["equals_reduced"] for s in trainer.steps]
    assert all(shared), shared
    rank = trainer.member
    # Each member applies the shared gradient with its own lr: lr in the groups is the gene times the schedule.
    for s in trainer.steps[1:]:
        expected = lr_genes[rank] * trainer.lr_scheduler.lr_lambdas[0](s["step"])
        assert math.isclose(s["lr"][0], expected, rel_tol=1e-9), (s, expected)
    ends = gather(weights["end"])
    assert len(set(ends)) == trainer.clan_size, "shared gradients, different lr: the weights must differ"


def make_soloist(trainer: ClanTrainer, far: int | None = None, low: bool = False) -> int:
    """Put member `far`'s (default: the last one's) learning rate on its high (or `low`) bound, far from the others'
    (which start near the configured one): with `solo_radius` it trains alone while the clan cooperates. Returns it."""
    far = trainer.clan_size - 1 if far is None else far
    gene = trainer.genomes[far]["learning_rate"]
    trainer.genomes[far]["learning_rate"] = dataclasses.replace(gene, value=gene.low if low else gene.high)
    return far


def check_soloist(output_dir):
    """With `solo_radius`, the members whose learning rates are far from the clan's, here one on each side, train
    on their own gradients while the clan cooperates, and the others share the mean of theirs alone."""
    trainer = make_trainer(
        output_dir, RecordingTrainer, duty_cycle=0.0, round_steps=3, max_steps=3, initial_spread="local",
        genes=["learning_rate"], solo_radius=0.25,
    )  # fmt: skip
    far = {make_soloist(trainer), make_soloist(trainer, trainer.clan_size - 2, low=True)}
    trainer.steps = []
    trainer.train()
    assert trainer.steps and all(s["alone"] == (trainer.member in far) for s in trainer.steps), trainer.steps
    if trainer.member in far:
        assert all(s["equals_local"] for s in trainer.steps), "the soloist applies its own gradient"
    else:
        assert all(s["equals_reduced"] for s in trainer.steps), "the others share the mean of theirs"
        assert not any(s["equals_local"] for s in trainer.steps)


class FixedFitnessTrainer(RecordingTrainer):
    """Ranks members by a fixed fitness (loss) instead of evaluating them: member 2 best, member 3 worst."""

    def _gather_fitness(self, averaged: bool = True) -> list[float]:
        return [3.0, 2.0, 1.0, 4.0]


def check_soloists_follow_the_best(output_dir):
    """Who trains alone is measured from the last round's best member (`solo_center="best"`): member 0 before the
    first round, member 2 after it. Members 0 and 1 sit near the configured rate, 2 and 3 near the upper bound, so
    in round 0 members 2 and 3 train alone, in round 1 members 0 and 1; every rank agrees, and each step applies
    the gradient its role says."""
    trainer = make_trainer(
        output_dir, FixedFitnessTrainer, duty_cycle=0.0, round_steps=2, max_steps=4, initial_spread="local",
        genes=["learning_rate"], solo_radius=0.25, warmup_steps=2, select_in_warmup=False,
    )  # fmt: skip
    assert trainer.args.solo_center == "best"
    gene = trainer.genomes[trainer.member]["learning_rate"]
    value = {0: gene.value, 1: gene.value * 1.2, 2: gene.high, 3: gene.high / 1.5}[trainer.member]
    trainer.genomes = [{"learning_rate": g} for g in gather(dataclasses.replace(gene, value=value))]
    trainer.steps = []
    trainer.train()
    alone = {s["step"]: s["alone"] for s in trainer.steps}
    by_step = gather(alone)
    for step, expected in ((0, {2, 3}), (1, {2, 3}), (2, {0, 1}), (3, {0, 1})):
        assert {m for m, a in enumerate(by_step) if a[step]} == expected, (step, by_step)
    assert all(s["equals_local"] if s["alone"] else s["equals_reduced"] for s in trainer.steps), trainer.steps


def check_window_learning_rate(output_dir, scaling):
    """In the competitive window a member that shares while cooperating takes its gene's rate times sqrt(1 / the
    members it shares with) (`window_lr_scaling`), a soloist its gene's rate; cooperative steps take the gene's rate.
    With scaling off, every step takes the gene's rate."""
    trainer = make_trainer(
        output_dir, RecordingTrainer, duty_cycle=0.5, round_steps=4, max_steps=4, initial_spread="local",
        genes=["learning_rate"], solo_radius=0.25, window_lr_scaling=scaling,
    )  # fmt: skip
    far = make_soloist(trainer) if trainer.clan_size > 2 else None
    gene = trainer.genomes[trainer.member]["learning_rate"].value
    trainer.steps = []
    trainer.train()
    cooperative = [s for s in trainer.steps if not s["competitive"]]
    competitive = [s for s in trainer.steps if s["competitive"]]
    assert [s["step"] for s in cooperative] == [0, 1] and [s["step"] for s in competitive] == [2, 3]
    # The sharers are counted from what every rank did in its cooperative steps, not read from the trainer.
    sharers = sum(not alone for alone in gather(cooperative[0]["alone"]))
    assert sharers == trainer.clan_size - (far is not None)
    factor = math.sqrt(1 / sharers) if scaling and trainer.member != far else 1.0
    for s in trainer.steps[1:]:
        expected = gene * trainer.lr_scheduler.lr_lambdas[0](s["step"]) * (factor if s["competitive"] else 1.0)
        assert math.isclose(s["lr"][0], expected, rel_tol=1e-9), (s, expected)
    assert all(r["genes"]["learning_rate"] == gene for r in trainer.clan_history if r["member"] == trainer.member)


def check_competitive(output_dir):
    """Cooperative steps share gradients and express the consensus dropout; competitive steps train every member
    on rank 0's batch, without sync, with its own dropout."""
    trainer = make_trainer(
        output_dir, RecordingTrainer, model=tiny_gpt2(dropout=0.1), genes=["learning_rate", "dropout"],
        round_steps=4, duty_cycle=0.5, max_steps=4,
    )  # fmt: skip
    trainer.steps = []
    trainer.train()
    genes = [r["genes"]["dropout"] for r in trainer.clan_history if r["round"] == 0]
    own = genes[trainer.member]
    assert trainer.clan_schedule["base"]["genes"]["dropout"] == 0.1, "the base is the configured dropout"
    mean = sum(genes) / len(genes)
    assert len(set(genes)) == trainer.clan_size, genes

    coop = [s for s in trainer.steps if not s["competitive"]]
    comp = [s for s in trainer.steps if s["competitive"]]
    assert [s["step"] for s in coop] == [0, 1] and [s["step"] for s in comp] == [2, 3]
    for s in coop:
        assert s["dropout"] == [round(mean, 12)], (s["dropout"], mean)
    for s in comp:
        assert s["dropout"] == [round(own, 12)], (s["dropout"], own)
        assert s["equals_local"], "competitive gradients are the member's own"
    batches = gather([s["batch"] for s in trainer.steps])
    for i in range(len(trainer.steps)):
        seen = {b[i] for b in batches}
        if trainer.steps[i]["competitive"]:
            assert len(seen) == 1, "competitive steps train every member on the same batch"
        else:
            assert len(seen) == trainer.clan_size, "cooperative steps use each member's own shard"


class CloneRecordingTrainer(ClanTrainer):
    """Keeps every member's state right before and right after each selection's exchange."""

    def _end_round(self):
        self.before = member_state(self)
        self.genomes_before = [dict(g) for g in self.genomes]
        super()._end_round()
        self.after = member_state(self)
        raise _StopAfterRound


class _StopAfterRound(Exception):
    pass


def check_clone(output_dir, fitness_ema_steps=0):
    """A clone's weights, buffers and Adam state (and its fitness EMA, with `fitness_ema_steps`) equal its source's
    bit for bit; its genome is the source's, mutated; members not in the plan keep everything."""
    trainer = make_trainer(output_dir, CloneRecordingTrainer, round_steps=3, max_steps=9, duty_cycle=0.34,
                           fitness_ema_steps=fitness_ema_steps)  # fmt: skip
    try:
        trainer.train()
    except _StopAfterRound:
        pass
    plan = {r["member"]: r["parent"] for r in trainer.clan_history if r["parent"] is not None}
    assert plan, "a selection must replace someone"
    befores, afters = gather(trainer.before), gather(trainer.after)
    for dst in range(trainer.clan_size):
        src = plan.get(dst, dst)
        assert set(afters[dst]) == set(befores[src])
        for key, value in befores[src].items():
            assert torch.equal(afters[dst][key], value), f"member {dst} differs from source {src} at {key}"
            assert afters[dst][key].dtype == value.dtype
        assert any(k.startswith("average.") for k in afters[dst]) == bool(fitness_ema_steps)
        steps = [k for k in afters[dst] if k.endswith(".step")]
        assert (
            steps
            and any(k.endswith(".exp_avg") for k in afters[dst])
            and any(k.endswith(".exp_avg_sq") for k in afters[dst])
        )
    for dst, src in plan.items():
        # One clone per round here, so it is not mirrored; the first round has no earlier clones to adapt scales by.
        rng = make_rng(trainer.args.seed, "mutate", 0, dst)
        expected = mutate(trainer.genomes_before[src], rng, trainer.args.resample_probability)
        assert trainer.genomes[dst] == expected
        assert trainer.genomes[dst] != trainer.genomes_before[src]
    assert len(set(gather(repr(trainer.genomes)))) == 1, "every rank holds the same genomes"


class ScriptedFitnessTrainer(ClanTrainer):
    """Member m scores 1 + m in round 0, 0.9 + m in round 1 (the clan improves, member 0 leads, every other member
    behind it on each of four eval batches alike) and 1.5 + m in round 2 (no improvement); it keeps every member's
    state and genomes around each round's exchange and stops after round 2."""

    def _member_fitness(self):
        value = {0: 1.0, 1: 0.9}.get(current_round(self), 1.5) + self.member
        self._fitness_batches = [value + d for d in (0.01, -0.01, 0.02, -0.02)]
        return value

    def _end_round(self):
        round_index, before, genomes = current_round(self), member_state(self), [dict(g) for g in self.genomes]
        super()._end_round()
        self.rounds = getattr(self, "rounds", {})
        self.rounds[round_index] = (before, member_state(self), genomes, [dict(g) for g in self.genomes])
        if round_index == 2:
            raise _StopAfterRound


def plans_by_round(history: list[dict]) -> dict[int, dict[int, int]]:
    """Each recorded round's selection (copies included) as `{replaced member: source}`, empty where none."""
    plans = {r["round"]: {} for r in history}
    for r in history:
        if r["parent"] is not None:
            plans[r["round"]][r["member"]] = r["parent"]
    return plans


def check_hold(output_dir):
    """Holding the best (4 members): round 0 has nothing to beat and makes no copy; round 1 (the best improves) makes
    member 2, the lowest member beaten on every eval batch and spared by selection, an exact copy of member 0: weights,
    Adam state and fitness EMA bit for bit, genes unmutated, while member 3 is the usual mutated clone; round 2, which
    does not improve, makes the copy a mutated clone of the best again, mirrored with selection's clone."""
    trainer = make_trainer(output_dir, ScriptedFitnessTrainer, round_steps=3, max_steps=12, duty_cycle=0.34,
                           fitness_ema_steps=3, hold_confidence=0.99)  # fmt: skip
    with pytest.raises(_StopAfterRound):
        trainer.train()
    parents = plans_by_round(trainer.clan_history)
    assert parents == {0: {3: 0}, 1: {2: 0, 3: 0}, 2: {2: 0, 3: 0}}, parents
    for round_index, copied in parents.items():
        before, after, _, genomes = trainer.rounds[round_index]
        befores, afters = gather(before), gather(after)
        for dst in copied:
            assert set(afters[dst]) == set(befores[0]) and any(k.startswith("average.") for k in afters[dst])
            for key, value in befores[0].items():
                assert torch.equal(afters[dst][key], value), f"round {round_index}: member {dst} differs at {key}"
    seed, resample = trainer.args.seed, trainer.args.resample_probability
    values = [genome_values(g) for g in trainer.rounds[0][3]]
    assert len({repr(v) for v in values}) == 4, "no copy after the first round"
    genomes = trainer.rounds[1][3]
    assert genomes[2] == genomes[0] and genome_values(genomes[1]) != genome_values(genomes[0]), "one copy, unmutated"
    for round_index in (0, 1):
        genomes = trainer.rounds[round_index][3]
        assert genomes[3] == mutate(genomes[0], make_rng(seed, "mutate", round_index, 3), resample)
    genomes = trainer.rounds[2][3]
    assert genomes[2] == mutate(genomes[0], make_rng(seed, "mutate", 2, 2), resample)
    assert genomes[3] == mutate(genomes[0], make_rng(seed, "mutate", 2, 2), resample, mirror=True)
    assert len(set(gather(repr(trainer.genomes)))) == 1, "every rank holds the same genomes"

    # Rounds ending inside the scheduler's warmup (steps 3 and 6 of a 6-step warmup) make no copy, though round 1
    # improves; round 2 does not improve, and there is no copy to release.
    trainer = make_trainer(f"{output_dir}/warmup", ScriptedFitnessTrainer, round_steps=3, max_steps=12,
                           duty_cycle=0.34, fitness_ema_steps=3, hold_confidence=0.99, warmup_steps=6)  # fmt: skip
    with pytest.raises(_StopAfterRound):
        trainer.train()
    replaced = {round_index: sorted(plan) for round_index, plan in plans_by_round(trainer.clan_history).items()}
    assert replaced == {0: [3], 1: [3], 2: [3]}, replaced


class NaNFitnessTrainer(ClanTrainer):
    def _member_fitness(self):
        return math.nan if self.member == 1 else super()._member_fitness()


def check_selection(output_dir):
    """Every rank computes the same plan; the best is never replaced; a NaN fitness ranks last."""
    trainer = make_trainer(output_dir, NaNFitnessTrainer, round_steps=2, duty_cycle=0.5, max_steps=8)
    assert trainer.args.hold_confidence == 0.0, "left unset, a clan of fewer than eight does not hold the best"
    trainer.train()
    histories = gather(trainer.clan_history)
    assert all(h == histories[0] for h in histories), "ranks disagree on the history"
    rounds = sorted({r["round"] for r in trainer.clan_history})
    assert rounds == [0, 1, 2, 3]
    for round_index in rounds[:-1]:
        records = [r for r in trainer.clan_history if r["round"] == round_index]
        assert records[1]["fitness"] is None and records[1]["parent"] is not None, "NaN member is replaced"
        finite = [r for r in records if r["fitness"] is not None]
        best = min(finite, key=lambda r: r["fitness"])
        assert best["parent"] is None, "the best member is never replaced"
        assert all(records[r["parent"]]["fitness"] is not None for r in records if r["parent"] is not None)
    assert all(r["parent"] is None for r in trainer.clan_history if r["round"] == rounds[-1])


def check_selection_waits_for_the_warmup(output_dir):
    """Rounds that end inside the scheduler's warmup rank and record but clone nothing, except a member whose fitness
    is not finite; later rounds select as usual, and `select_in_warmup=True` selects in every round."""
    for select_in_warmup in (False, True):
        # Rounds of 2 steps ending at steps 2, 4, 6 (8 is the final evaluation); the warmup ends at step 4.
        trainer = make_trainer(f"{output_dir}/{select_in_warmup}", NaNFitnessTrainer, round_steps=2, duty_cycle=0.5,
                               max_steps=8, warmup_steps=4, selection_fraction=0.5, save_strategy="no",
                               select_in_warmup=select_in_warmup)  # fmt: skip
        trainer.train()
        histories = gather(trainer.clan_history)
        assert all(h == histories[0] for h in histories), "ranks disagree on the history"
        plans = plans_by_round(trainer.clan_history)
        replaced = {round_index: sorted(plans[round_index]) for round_index in (0, 1, 2)}
        two = dist.get_world_size() // 2  # selection_fraction=0.5 replaces half the clan: the NaN member and others
        for round_index, members in replaced.items():
            in_warmup = round_index < 2 and not select_in_warmup
            assert 1 in members, "the NaN member is replaced, in the warmup too"
            assert len(members) == (1 if in_warmup else two), (select_in_warmup, replaced)
        card = model_card_body(trainer, "clan", None, is_peft=False)
        assert ("4-step learning-rate warmup ranked without cloning" in card) != select_in_warmup


def check_fitness_ema(output_dir):
    """Fitness is measured at the EMA of the weights. With a horizon of one step the EMA is the last weights: the
    same run as without it, bit for bit. With a horizon longer than the run it is the mean of every step so far:
    round 0 ranks what the window average over the whole round ranks, and later rounds differ, because the EMA goes
    on where the window's average starts afresh."""
    settings = {"raw": {"fitness_ema_steps": 0}, "ema1": {"fitness_ema_steps": 1},
                "long": {"fitness_ema_steps": 100}, "window": {"fitness_average_window": 1.0}}  # fmt: skip
    fitness = {}
    for name, kwargs in settings.items():
        trainer = make_trainer(f"{output_dir}/{name}", max_steps=12, **kwargs)
        trainer.train()
        fitness[name] = {(r["round"], r["member"]): r["fitness"] for r in trainer.clan_history}
    assert fitness["ema1"] == fitness["raw"]
    members = range(dist.get_world_size())
    for member in members:
        assert math.isclose(fitness["long"][0, member], fitness["window"][0, member], rel_tol=1e-6)
        assert fitness["long"][0, member] != fitness["raw"][0, member]
    assert [fitness["long"][1, m] for m in members] != [fitness["window"][1, m] for m in members]


class StopAfter(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt  # stands for a killed job, right after its checkpoint is complete


def resumed_after_stop(make, output_dir: str, step: int, **settings) -> ClanTrainer:
    """A run made by `make(output_dir, **settings)`, stopped right after its checkpoint at `step` (as a killed job
    would be), then resumed from that checkpoint by a new trainer, which is returned."""
    stopped = make(output_dir, **settings)
    stopped.add_callback(StopAfter(step))
    try:
        stopped.train()
    except KeyboardInterrupt:
        pass
    resumed = make(output_dir, **settings)
    resumed.train(resume_from_checkpoint=f"{output_dir}/checkpoint-{step}")
    return resumed


def check_fitness_ema_resume(output_dir):
    """A run stopped at a checkpoint in mid-round and resumed equals one never interrupted: the fitness EMA is in the
    checkpoint, so every later round ranks the same."""
    settings = dict(max_steps=12, save_strategy="steps", save_steps=6, fitness_ema_steps=3)
    uninterrupted = make_trainer(f"{output_dir}/a", **settings)
    uninterrupted.train()
    resumed = resumed_after_stop(make_trainer, f"{output_dir}/b", 6, **settings)
    assert resumed.clan_history == uninterrupted.clan_history
    assert all(torch.equal(a, b) for a, b in zip(resumed._average.mean, uninterrupted._average.mean, strict=True))


def check_final(output_dir):
    """After train() every rank holds the best member; save_model reloads to the best final fitness."""
    trainer = make_trainer(output_dir, round_steps=4, duty_cycle=0.25, max_steps=12)
    trainer.train()
    final = [r for r in trainer.clan_history if r["round"] == max(r["round"] for r in trainer.clan_history)]
    best = min(final, key=lambda r: r["fitness"])
    assert len(set(gather(digest(p for _, p in member_tensors(trainer.model))))) == 1, "ranks differ after train"
    assert trainer.clan_schedule["best_member"] == best["member"]
    assert trainer._member_fitness() == best["fitness"], "every rank now holds the best member"
    # ... and expresses its learning rate as it is, unscaled by the competitive window the run ended in.
    assert math.isclose(trainer.lr_scheduler.base_lrs[0], best["genes"]["learning_rate"], rel_tol=1e-9)
    trainer.save_model(output_dir)
    dist.barrier()
    reloaded = AutoModelForCausalLM.from_pretrained(output_dir)
    trainer.model = reloaded.to(trainer.args.device)
    trainer._fitness_loader = None
    assert math.isclose(trainer._member_fitness(), best["fitness"], rel_tol=1e-6)


def check_promotes_training_arguments(output_dir):
    """A plain TrainingArguments becomes a ClanConfig with the clan defaults."""
    args = TrainingArguments(output_dir=output_dir, max_steps=400, report_to="none", use_cpu=True)
    trainer = ClanTrainer(
        model=tiny_gpt2(), args=args, train_dataset=PatternDataset(8), eval_dataset=PatternDataset(8)
    )
    assert isinstance(trainer.args, ClanConfig) and trainer.args.round_steps == 200
    assert trainer.args.max_steps == 400


def check_metric_fitness(output_dir):
    """With metric_for_best_model and compute_metrics, fitness is that metric and higher ranks first."""
    import numpy as np
    from testing_utils import LabelDataset, tiny_bert_classifier

    def accuracy(prediction):
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    args = ClanConfig(output_dir=output_dir, round_steps=3, duty_cycle=0.34, max_steps=6, learning_rate=1e-3,
                      per_device_train_batch_size=8, per_device_eval_batch_size=8, report_to="none",
                      disable_tqdm=True, metric_for_best_model="accuracy", greater_is_better=True,
                      selection_confidence=0.5)  # fmt: skip
    trainer = ClanTrainer(model=tiny_bert_classifier(), args=args, train_dataset=LabelDataset(128),
                          eval_dataset=LabelDataset(20, seed=1), compute_metrics=accuracy)  # fmt: skip
    trainer.train()
    for round_index in (0, 1):
        records = [r for r in trainer.clan_history if r["round"] == round_index]
        assert all(r["fitness"] in {k / 20 for k in range(21)} for r in records), "fitness is an accuracy on 20"
    first = [r for r in trainer.clan_history if r["round"] == 0]
    best = max(first, key=lambda r: (r["fitness"], -r["member"]))
    assert best["parent"] is None
    replaced = [r for r in first if r["parent"] is not None]
    assert all(r["fitness"] <= first[r["parent"]]["fitness"] for r in replaced), "higher accuracy ranks first"
    final = [r for r in trainer.clan_history if r["round"] == 1]
    assert trainer.clan_schedule["best_member"] == max(final, key=lambda r: (r["fitness"], -r["member"]))["member"]
    # The paired test's scores are the metric per eval batch (8, 8 and 4 samples), averaging to the fitness.
    batches = trainer._fitness_batches
    assert len(batches) == 3 and all(a in {k / 8 for k in range(9)} for a in batches[:2]), batches
    assert math.isclose((8 * batches[0] + 8 * batches[1] + 4 * batches[2]) / 20, final[trainer.member]["fitness"])


def _ignore(trainer, value):
    """A gene that changes nothing."""


class BatchLossTrainer(ClanTrainer):
    """Keeps each member's eval loss per batch, computed on the spot on its unwrapped model, at every fitness."""

    def _gather_fitness(self, averaged=True):
        self.model.eval()
        with torch.no_grad():
            self.reference_batches = [
                self.model(**{k: torch.stack([self.eval_dataset[i][k] for i in range(start, start + 8)]) for k in
                              ("input_ids", "labels")}).loss.item()
                for start in range(0, len(self.eval_dataset), 8)
            ]  # fmt: skip
        self.model.train()
        fitness = super()._gather_fitness(averaged)
        if self.args.selection_confidence > 0:
            assert self._fitness_batches == pytest.approx(self.reference_batches, rel=1e-6)
        return fitness


def check_selection_waits_for_a_significant_margin(output_dir):
    """Members whose only gene changes nothing stay identical, so they tie on every eval batch: plain truncation
    selection still replaces the last member each round (ties rank by member id), while a gated one never does.
    Each member's scores per batch are its own eval loss on each batch."""
    genes = {"noop": {"value": 0.5, "low": 0.0, "high": 1.0, "expression": _ignore}}
    for confidence, replaces in ((0.0, True), (0.5, False)):
        # Fitness at the last weights (no EMA): the reference evaluates them.
        trainer = make_trainer(f"{output_dir}/{confidence}", BatchLossTrainer, genes=genes, max_steps=12,
                               selection_confidence=confidence, save_strategy="no", fitness_ema_steps=0)  # fmt: skip
        trainer.train()
        fitness = {r["fitness"] for r in trainer.clan_history}
        assert len(fitness) == len(trainer.clan_history) // dist.get_world_size(), "members tie in every round"
        parents = [r["parent"] for r in trainer.clan_history if r["parent"] is not None]
        assert bool(parents) == replaces, (confidence, trainer.clan_history)
        if replaces:
            assert len(parents) == 2 and set(parents) == {0}, "rounds 0 and 1 each replace the last member"


class ShortDataTrainer(ClanTrainer):
    """Rank 1 runs out of data at step 4 of a 6-step epoch; the others still have batches."""

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if self.member == 1 and self.state.global_step >= 4:
            epoch_iterator = iter([])
        return super().get_batch_samples(epoch_iterator, num_batches, device)


def check_short_data(output_dir):
    """Without accelerate's even batches, a rank short of data makes every rank stop where it stopped, instead of
    one rank's backward waiting for a rank that already moved on to the final evaluation."""
    clan_size = dist.get_world_size()
    args = ClanConfig(output_dir=output_dir, round_steps=3, duty_cycle=0.0, num_train_epochs=1,
                      per_device_train_batch_size=4, report_to="none", disable_tqdm=True, seed=1,
                      accelerator_config={"even_batches": False})  # fmt: skip
    train = PatternDataset(6 * 4 * clan_size)  # six steps per epoch
    trainer = ShortDataTrainer(model=tiny_gpt2(dropout=0.0), args=args, train_dataset=train,
                               eval_dataset=PatternDataset(8, seed=1))  # fmt: skip
    trainer.train()
    assert gather(trainer.state.global_step) == [4] * clan_size
    assert len(set(gather(digest(p for _, p in member_tensors(trainer.model))))) == 1
    assert [r["round"] for r in trainer.clan_history] == [0] * clan_size + [1] * clan_size
