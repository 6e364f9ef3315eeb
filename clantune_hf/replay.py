"""Replaying a discovered schedule (`clan_schedule.json`) in a plain, single-process `Trainer`: no clan needed.

    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=evals)
    trainer.add_callback(ScheduleReplayCallback.from_file("runs/clan/clan_schedule.json", trainer))
    trainer.train()

At the start of every optimizer step the callback sets each gene to its value in the schedule segment holding that
step (the last segment holds after the schedule ends), exactly where `ClanTrainer` expresses it: the learning rate
scales the Trainer's own scheduler (its warmup/decay shape stays, the gene sets its peak), weight decay applies to
the decay parameter group only, betas and eps go to every parameter group, `max_grad_norm` is the clipping
threshold, `dropout` every dropout probability of the model, `label_smoothing_factor` the Trainer's label
smoother, `gradient_accumulation_steps` how many micro-batches the step accumulates, and a gene of the user's own
goes through its expression (an attribute path recorded in the schedule, or the callable passed as `expressions`).
The values are those of the best member's lineage, in both phases of a round: the clan's consensus values for
specialized genes during its cooperative steps were an artifact of sharing gradients, not part of the schedule.
"""

from __future__ import annotations

import itertools
import json
import os

from transformers import Trainer, TrainerCallback
from transformers.utils import logging

from .accumulation import GENE as ACCUMULATION
from .accumulation import run_slot, to_slots
from .expression import Expression, ExpressionLike, check_expressible, decay_groups, express, with_cooldown
from .genes import GENE_SPECS
from .history import SCHEDULE_NAME

logger = logging.get_logger(__name__)


class ScheduleReplayCallback(TrainerCallback):
    """Make a [`~transformers.Trainer`] follow a schedule discovered by a clan, step by step.

    Args:
        schedule (`dict`):
            The content of `clan_schedule.json`: `segments` (`start_step`, `end_step`, `genes`) and `base` (the clan
            run's `learning_rate`, `lr_scheduler_type` and `warmup_steps`).
        trainer ([`~transformers.Trainer`]):
            The trainer to drive: the callback sets its optimizer's parameter groups, its scheduler's base learning
            rates, its `args.max_grad_norm`, its model's dropout and its label smoother.
    """

    def __init__(self, schedule: dict, trainer: Trainer, expressions: dict[str, ExpressionLike] | None = None):
        segments = sorted(schedule["segments"], key=lambda segment: segment["start_step"])
        if not segments:
            raise ValueError("The schedule has no segments; replay the clan_schedule.json of a finished clan run.")
        base = schedule.get("base", {})
        # The user's own genes: the callables passed here, else the attribute paths the clan recorded.
        known = {**{k: v for k, v in base.get("expressions", {}).items() if v is not None}, **(expressions or {})}
        unknown = set(segments[0]["genes"]) - set(GENE_SPECS) - set(known)
        if unknown:
            raise ValueError(
                f"The schedule has genes {sorted(unknown)} of your own whose expression is a callable; pass them as "
                "`expressions={name: callable}`."
            )
        integers = set(base.get("integers", []))
        self.custom = {
            name: Expression(how, name in integers) for name, how in known.items() if name in segments[0]["genes"]
        }
        for name, expression in self.custom.items():
            expression.check(trainer, name)
        if ACCUMULATION in segments[0]["genes"]:
            most = max(int(segment["genes"][ACCUMULATION]) for segment in segments)
            if trainer.args.gradient_accumulation_steps < most:
                raise ValueError(
                    f"The schedule accumulates up to {most} micro-batches a step; set `gradient_accumulation_steps` "
                    f"to at least {most}, the most any step takes (each step takes the schedule's count)."
                )
        self.schedule = schedule
        self.segments = segments
        self.trainer = trainer
        self._user_base_lrs: list[float] | None = None
        self._user_max_grad_norm: float | None = None
        self._decay_groups: list[bool] = []
        self._accumulated = 1

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        trainer: Trainer,
        expressions: dict[str, ExpressionLike] | None = None,
    ) -> ScheduleReplayCallback:
        """Read `path`: a `clan_schedule.json`, or the output directory of a clan run that holds one."""
        if os.path.isdir(path):
            path = os.path.join(path, SCHEDULE_NAME)
        with open(path) as f:
            return cls(json.load(f), trainer, expressions)

    def genes_at(self, step: int) -> dict[str, float]:
        """The gene values for optimizer step `step` (0-based): those of the segment holding it, or the last one."""
        for segment in self.segments:
            if step < segment["end_step"]:
                return segment["genes"]
        return self.segments[-1]["genes"]

    def on_train_begin(self, args, state, control, **kwargs):
        trainer, base = self.trainer, self.schedule.get("base", {})
        genes = self.segments[0]["genes"]
        check_expressible(trainer, genes)
        # The scheduler's base_lrs before any gene scales them: the shape the learning-rate gene multiplies.
        self._user_base_lrs = list(getattr(trainer.lr_scheduler, "base_lrs", []))
        scheduler_type = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
        if "learning_rate" in genes and base.get("lr_scheduler_type", scheduler_type) != scheduler_type:
            logger.warning(
                f"The schedule was found with lr_scheduler_type={base['lr_scheduler_type']!r} and is replayed on "
                f"{scheduler_type!r}: the learning-rate gene will scale a different shape."
            )
        self._decay_groups = decay_groups(trainer)
        # The clan's final cooldown is part of its schedule: the replay decays the same way.
        with_cooldown(trainer.lr_scheduler, base.get("cooldown_fraction", 0.0), state.max_steps)
        if "max_grad_norm" in genes and not args.max_grad_norm > 0:
            raise ValueError("The schedule has a max_grad_norm gene; set `max_grad_norm` > 0 so the Trainer clips.")
        self._user_max_grad_norm = args.max_grad_norm
        if ACCUMULATION in genes:
            self._accumulate_by_schedule()

    def on_train_end(self, args, state, control, **kwargs):
        args.max_grad_norm = self._user_max_grad_norm  # the arguments saved with the model stay the user's
        for method in ("get_batch_samples", "training_step"):  # the trainer's own again
            self.trainer.__dict__.pop(method, None)

    def on_step_begin(self, args, state, control, **kwargs):
        genes = self.genes_at(state.global_step)
        express(self.trainer, genes, self._user_base_lrs, self._decay_groups, self.custom)
        if "max_grad_norm" in genes:
            args.max_grad_norm = genes["max_grad_norm"]

    def _accumulate_by_schedule(self) -> None:
        """Make each step of the trainer accumulate the schedule's number of micro-batches, as the clan did (the
        slots of accumulation.py; the count never exceeds the trainer's own, checked in __init__)."""
        trainer = self.trainer
        training_step = trainer.training_step

        def scheduled_batch_samples(epoch_iterator, num_batches, device):
            count = int(self.genes_at(trainer.state.global_step)[ACCUMULATION])
            batches = list(itertools.islice(epoch_iterator, count))
            self._accumulated = len(batches)
            return to_slots(batches, num_batches), trainer._get_num_items_in_batch(batches, device)

        def scheduled_training_step(model, inputs, num_items_in_batch=None):
            return run_slot(trainer, model, inputs, num_items_in_batch, training_step, self._accumulated, sync=True)

        trainer.get_batch_samples = scheduled_batch_samples
        trainer.training_step = scheduled_training_step
