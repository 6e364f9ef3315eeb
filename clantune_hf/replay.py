"""Replaying a discovered schedule (`clan_schedule.json`) in a plain, single-process `Trainer`: no clan needed.

    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=evals)
    trainer.add_callback(ScheduleReplayCallback.from_file("runs/clan/clan_schedule.json", trainer))
    trainer.train()

At the start of every optimizer step the callback sets each gene to its value in the schedule segment holding that
step (the last segment holds after the schedule ends), exactly where `ClanTrainer` expresses it: the learning rate
scales the Trainer's own scheduler (its warmup/decay shape stays, the gene sets its peak), weight decay applies to
the decay parameter group only, betas and eps go to every parameter group, `max_grad_norm` is the clipping
threshold, `dropout` every dropout probability of the model and `label_smoothing_factor` the Trainer's label
smoother. The values are those of the best member's lineage, in both phases of a round: the clan's consensus values
for specialized genes during its cooperative steps were an artifact of sharing gradients, not part of the schedule.
"""

from __future__ import annotations

import json
import os

from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import LabelSmoother
from transformers.utils import logging

from .dropout import set_dropout
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

    def __init__(self, schedule: dict, trainer: Trainer):
        segments = sorted(schedule["segments"], key=lambda segment: segment["start_step"])
        if not segments:
            raise ValueError("The schedule has no segments; replay the clan_schedule.json of a finished clan run.")
        unknown = set(segments[0]["genes"]) - set(GENE_SPECS)
        if unknown:
            raise ValueError(f"The schedule has genes {sorted(unknown)} that are not among {sorted(GENE_SPECS)}.")
        self.schedule = schedule
        self.segments = segments
        self.trainer = trainer
        self._user_base_lrs: list[float] | None = None
        self._user_max_grad_norm: float | None = None
        self._decay_groups: list[bool] = []

    @classmethod
    def from_file(cls, path: str | os.PathLike, trainer: Trainer) -> ScheduleReplayCallback:
        """Read `path`: a `clan_schedule.json`, or the output directory of a clan run that holds one."""
        if os.path.isdir(path):
            path = os.path.join(path, SCHEDULE_NAME)
        with open(path) as f:
            return cls(json.load(f), trainer)

    def genes_at(self, step: int) -> dict[str, float]:
        """The gene values for optimizer step `step` (0-based): those of the segment holding it, or the last one."""
        for segment in self.segments:
            if step < segment["end_step"]:
                return segment["genes"]
        return self.segments[-1]["genes"]

    def on_train_begin(self, args, state, control, **kwargs):
        trainer, base = self.trainer, self.schedule.get("base", {})
        genes = self.segments[0]["genes"]
        # The scheduler's base_lrs before any gene scales them: the shape the learning-rate gene multiplies.
        if "learning_rate" in genes:
            if not hasattr(trainer.lr_scheduler, "base_lrs"):
                raise ValueError(
                    f"The learning_rate gene scales the scheduler's base_lrs, which "
                    f"{type(trainer.lr_scheduler).__name__} lacks; use an lr_scheduler_type such as 'linear', "
                    "'cosine' or 'constant'."
                )
            self._user_base_lrs = list(trainer.lr_scheduler.base_lrs)
            scheduler_type = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
            if base.get("lr_scheduler_type", scheduler_type) != scheduler_type:
                logger.warning(
                    f"The schedule was found with lr_scheduler_type={base['lr_scheduler_type']!r} and is replayed on "
                    f"{scheduler_type!r}: the learning-rate gene will scale a different shape."
                )
        decay_names = set(trainer.get_decay_parameter_names(trainer.model))
        decay_ids = {id(p) for name, p in trainer.model.named_parameters() if name in decay_names}
        self._decay_groups = [any(id(p) in decay_ids for p in g["params"]) for g in trainer.optimizer.param_groups]
        for name, key in (("adam_beta1", "betas"), ("adam_beta2", "betas"), ("adam_epsilon", "eps")):
            if name in genes and key not in trainer.optimizer.param_groups[0]:
                raise ValueError(f"The schedule has a {name} gene, but `optim={args.optim}` has no {key}.")
        if "max_grad_norm" in genes and not args.max_grad_norm > 0:
            raise ValueError("The schedule has a max_grad_norm gene; set `max_grad_norm` > 0 so the Trainer clips.")
        self._user_max_grad_norm = args.max_grad_norm

    def on_train_end(self, args, state, control, **kwargs):
        args.max_grad_norm = self._user_max_grad_norm  # the arguments saved with the model stay the user's

    def on_step_begin(self, args, state, control, **kwargs):
        trainer, genes = self.trainer, self.genes_at(state.global_step)
        # Param-group dicts are looked up now: accelerate replaces them when it wraps the optimizer.
        for i, group in enumerate(trainer.optimizer.param_groups):
            if "weight_decay" in genes and self._decay_groups[i]:
                group["weight_decay"] = genes["weight_decay"]
            if "adam_beta1" in genes or "adam_beta2" in genes:
                beta1, beta2 = group["betas"]
                group["betas"] = (genes.get("adam_beta1", beta1), genes.get("adam_beta2", beta2))
            if "adam_epsilon" in genes:
                group["eps"] = genes["adam_epsilon"]
            if "learning_rate" in genes:
                # As ClanTrainer does: scale the schedule's base; LambdaLR recomputes lr from it on every step.
                scheduler = trainer.lr_scheduler
                new_base = self._user_base_lrs[i] * genes["learning_rate"] / args.learning_rate
                old_base = scheduler.base_lrs[i]
                group["lr"] = group["lr"] * new_base / old_base if old_base else new_base
                group["initial_lr"] = scheduler.base_lrs[i] = new_base
        if "max_grad_norm" in genes:
            args.max_grad_norm = genes["max_grad_norm"]
        if "dropout" in genes:
            set_dropout(trainer.model, genes["dropout"])
        if "label_smoothing_factor" in genes:
            trainer.label_smoother = LabelSmoother(epsilon=genes["label_smoothing_factor"])
