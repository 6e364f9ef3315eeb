"""The end of a round: every member's fitness, selection, cloning and mutation; and the final round, after which every
rank holds the best member.

Every function here runs on every rank, in the same order, with the same arguments: the genomes, the history and the
selection plan are derived from the config, the seed and gathered numbers only, and `record_round` checks that every
rank agrees before anything is copied. `ClanTrainer` calls them from its round hooks (`_end_round`, `_final_round`,
`_gather_fitness`, `_member_fitness`), which tests and benchmarks override to inject faults or time the work.
"""

from __future__ import annotations

import contextlib
import math
import statistics
from typing import TYPE_CHECKING

import torch.distributed as dist
from transformers import TrainerCallback

from .exchange import all_gather_floats, broadcast_weights, recv_member, send_member
from .fitness import average_step, is_paired
from .genetics import (
    adapt_scales,
    checksum,
    copy_genome,
    genome_values,
    hold_the_best,
    make_rng,
    rank_members,
    reproduce,
    selection_plan,
)
from .history import (
    build_schedule,
    last_fitness,
    last_plan,
    member_prefix,
    round_records,
    write_history,
    write_schedule,
)

if TYPE_CHECKING:
    from .clan_trainer import ClanTrainer


def round_index(trainer: ClanTrainer) -> int:
    """The round the last optimizer step belongs to."""
    return (trainer.state.global_step - 1) // trainer.args.round_steps


def in_warmup(trainer: ClanTrainer, step: int) -> bool:
    """Whether `step` is inside the scheduler's warmup, where every member's rate is still scaled down, so a ranking
    says little about the rate genes yet. Decided from the step and the config, the same on every rank."""
    return step <= trainer.args.get_warmup_steps(trainer.state.max_steps)


def ranks_only(trainer: ClanTrainer, step: int) -> bool:
    """Whether the round ending at `step` ranks without cloning (`select_in_warmup=False`, inside the warmup)."""
    return not trainer.args.select_in_warmup and in_warmup(trainer, step)


def end_round(trainer: ClanTrainer) -> None:
    """Fitness, selection, cloning and mutation, at the last step of every round but the final one."""
    args, step, index = trainer.args, trainer.state.global_step, round_index(trainer)
    fitness = trainer._gather_fitness()
    if trainer.search.step_size_control == "success":
        trainer.genomes = adapt_scales(
            trainer.genomes, last_plan(trainer.clan_history), fitness, trainer.greater_is_better
        )
    rank_only = ranks_only(trainer, step)
    # A collective: every rank takes this branch alike (config and step); a rank-only round has no use for it.
    batch_scores = gather_fitness_batches(trainer) if is_paired(trainer) and not rank_only else None
    plan = selection_plan(
        fitness,
        trainer.greater_is_better,
        args.selection_fraction,
        make_rng(args.seed, "select", index),
        batch_scores=batch_scores,
        confidence=args.selection_confidence,
        rank_only=rank_only,
    )
    copies = {}
    # Not inside the warmup: there the largest rate genes look best, and copies of one would leave the clan nothing
    # else when the warmup ends and that rate turns out too large.
    if args.hold_confidence > 0 and not in_warmup(trainer, step):
        previous = last_fitness(trainer.clan_history)
        plan, copies = hold_the_best(
            trainer.genomes, fitness, previous, batch_scores, plan, trainer.greater_is_better, args.hold_confidence
        )
    record_round(trainer, fitness, plan | copies)
    copy_members(trainer, plan | copies)
    children = reproduce(trainer.genomes, plan, args.seed, index, trainer.search)
    trainer.genomes = [copy_genome(trainer.genomes[copies[m]]) if m in copies else g for m, g in enumerate(children)]
    trainer._expressed_phase = None
    trainer._diverged = False


def copy_members(trainer: ClanTrainer, plan: dict[int, int]) -> None:
    """Overwrite each member `dst` of a {dst: src} plan with member `src`'s weights and optimizer state."""
    layout = trainer.layout
    for dst, src in sorted(plan.items()):
        # Only the two ranks of a pair take part; every rank walks the same plan in the same order.
        # A fitness EMA is the member's own history, so the clone takes its source's. Both ranks hold one (every
        # member folds in every step); a window's average is empty between rounds and sends nothing.
        ema = (trainer._average.mean or []) if trainer.args.fitness_ema_steps else []
        if trainer.member == src:
            send_member(trainer.model, trainer.optimizer, layout.rank_of(dst), ema)
        elif trainer.member == dst:
            recv_member(trainer.model, trainer.optimizer, layout.rank_of(src), ema)


def final_round(trainer: ClanTrainer) -> None:
    """The final evaluation: record it, then every rank takes the best member's weights and genes."""
    args = trainer.args
    fitness = trainer._gather_fitness(averaged=False)  # the weights as they are: what the user gets
    record_round(trainer, fitness, {})
    best = rank_members(fitness, trainer.greater_is_better)[0]
    broadcast_weights(trainer.model, trainer.layout.rank_of(best), trainer.layout.peer_group)
    trainer.genomes = [copy_genome(trainer.genomes[best]) for _ in range(trainer.clan_size)]
    trainer._expressed_phase = None
    trainer._express(competitive=True, window=False)  # the best member's genes as they are, for what follows
    trainer.label_smoother = trainer._user_label_smoother
    trainer.clan_schedule = build_schedule(
        trainer.clan_history,
        args.round_steps,
        trainer.state.global_step,
        trainer.greater_is_better,
        base={
            "learning_rate": args.learning_rate,
            "lr_scheduler_type": str(args.lr_scheduler_type.value),
            "warmup_steps": args.get_warmup_steps(trainer.state.max_steps),
            "cooldown_fraction": args.cooldown_fraction,
            "genes": genome_values(trainer.base_genome),
            # A replay applies the user's own genes itself when their expression is an attribute path.
            "expressions": {
                name: expression.how if isinstance(expression.how, str) else None
                for name, expression in trainer._custom.items()
            },
            "integers": sorted(name for name, gene in trainer.base_genome.items() if gene.integer),
        },
    )
    if args.should_save:
        write_schedule(args.output_dir, trainer.clan_schedule)


def gather_fitness(trainer: ClanTrainer, averaged: bool = True) -> list[float]:
    """Every member's fitness, on every rank. `averaged`: at the fitness weight average (the round's last weights'
    mean, or the EMA), if any. A member whose gradient diverged this round has NaN, and ranks last."""
    trainer._fitness_batches = None
    average = trainer._average
    with average.swapped_in(trainer.model) if averaged else contextlib.nullcontext():
        own = math.nan if trainer._diverged else trainer._member_fitness()
    if not trainer.args.fitness_ema_steps:
        average.reset()  # a window's average starts afresh each round; an EMA goes on
    return trainer.layout.per_member(all_gather_floats(own))


def gather_fitness_batches(trainer: ClanTrainer) -> list[list[float] | None]:
    """Every member's last fitness per eval batch (None for a member that has none), on every rank."""
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, trainer._fitness_batches)
    return trainer.layout.per_member(every)


def record_round(trainer: ClanTrainer, fitness: list[float], plan: dict[int, int]) -> None:
    """Check that every rank agrees, append the round to the history, and log its scalars."""
    sums = all_gather_floats(float(checksum(trainer.genomes, plan)))
    if len(set(sums)) != 1:
        raise RuntimeError(
            f"Clan members disagree on the genomes or selection plan (checksum per rank: {sums}); every rank must "
            "run the same ClanConfig, seed and package versions."
        )
    history = trainer.clan_history
    index = round_index(trainer)
    if history and history[-1]["round"] >= index:
        index = history[-1]["round"] + 1
    history.extend(round_records(index, trainer.state.global_step, fitness, trainer.genomes, plan))
    if trainer.args.should_save:
        write_history(trainer.args.output_dir, history)

    finite = [f for f in fitness if math.isfinite(f)]
    best = rank_members(fitness, trainer.greater_is_better)[0]
    logs = {
        "clan/round": index,
        "clan/fitness_min": min(finite, default=math.nan),
        "clan/fitness_median": statistics.median(finite) if finite else math.nan,
        "clan/fitness_max": max(finite, default=math.nan),
        "clan/best_member": best,
        "clan/replaced": len(plan),
    }
    logs.update({f"clan/best_{name}": value for name, value in genome_values(trainer.genomes[best]).items()})
    # Every member's fitness and the genes it earned it with; `cloned_from` appears only in rounds that replaced the
    # member, so each point on that chart is a clone event.
    for member, genome in enumerate(trainer.genomes):
        prefix = member_prefix(member, trainer.clan_size)
        logs[f"{prefix}/fitness"] = fitness[member]
        logs.update({f"{prefix}/{name}": value for name, value in genome_values(genome).items()})
        if member in plan:
            logs[f"{prefix}/cloned_from"] = plan[member]
    trainer.log(logs)


class RoundCallback(TrainerCallback):
    """Ends a round after its last optimizer step, before the Trainer logs or saves that step, and runs the final
    evaluation when training ends. `ClanTrainer` puts it first in line, so the final round is logged before other
    callbacks' `on_train_end` close their writers."""

    def __init__(self, trainer: ClanTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        # ClanConfig checks `max_steps`; a run set by epochs knows its length only now.
        if args.round_steps > state.max_steps:
            raise ValueError(
                f"`round_steps` ({args.round_steps}) is larger than the run's {state.max_steps} optimizer steps: no "
                "round would finish. Lower round_steps or train longer."
            )

    def on_step_end(self, args, state, control, **kwargs):
        average_step(self.trainer)
        if state.global_step % args.round_steps == 0 and state.global_step < state.max_steps:
            self.trainer._end_round()

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer._final_round()
