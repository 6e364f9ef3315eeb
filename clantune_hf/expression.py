"""Expressing genes: making a Trainer's optimizer, scheduler, model and loss follow a set of gene values.

`ClanTrainer` expresses a member's genome at every phase change; `ScheduleReplayCallback` expresses a discovered
schedule at every step of a plain `Trainer`. Both go through `express`, so a replay does exactly what the clan did.
`max_grad_norm` is left to the caller: the clan clips in `_clip_grad_norm`, a replay through `args.max_grad_norm`;
so is `gradient_accumulation_steps`, which decides how many micro-batches the next step takes (accumulation.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer_pt_utils import LabelSmoother

from .dropout import set_dropout
from .genes import is_custom

ExpressionLike = Callable[[Any, float], None] | str  # what a `genes` entry gives as its `expression`


@dataclass(frozen=True)
class Expression:
    """How a gene of the user's own reaches training: `how(trainer, value)`, or an attribute path from the trainer."""

    how: ExpressionLike
    integer: bool = False

    def check(self, trainer: Trainer, name: str) -> None:
        """Refuse an attribute path that does not lead anywhere on this trainer, before any compute."""
        if callable(self.how):
            return
        target = trainer
        for i, attribute in enumerate(self.how.split(".")):
            if not hasattr(target, attribute):
                reached = ".".join(["trainer", *self.how.split(".")[:i]])
                raise ValueError(
                    f"`genes[{name!r}]['expression']` = {self.how!r}: {reached} has no attribute {attribute!r}. Give "
                    "an attribute path from the trainer that exists (e.g. 'model.config.aux_loss_coef'), or a "
                    "callable expression(trainer, value)."
                )
            target = getattr(target, attribute)

    def __call__(self, trainer: Trainer, value: float) -> None:
        value = int(round(value)) if self.integer else value
        if callable(self.how):
            self.how(trainer, value)
            return
        *parents, attribute = self.how.split(".")
        target = trainer
        for parent in parents:
            target = getattr(target, parent)
        setattr(target, attribute, value)


def custom_expressions(genes: dict[str, dict]) -> dict[str, Expression]:
    """The expressions of the genes of the user's own among the parsed `genes` options."""
    return {
        name: Expression(options["expression"], bool(options.get("integer", False)))
        for name, options in genes.items()
        if is_custom(options)
    }


def decay_groups(trainer: Trainer) -> list[bool]:
    """For each of the optimizer's parameter groups, whether weight decay applies to it (it holds decay params)."""
    names = set(trainer.get_decay_parameter_names(trainer.model))
    decay_ids = {id(p) for name, p in trainer.model.named_parameters() if name in names}
    return [any(id(p) in decay_ids for p in group["params"]) for group in trainer.optimizer.param_groups]


def check_expressible(trainer: Trainer, genes: Iterable[str]) -> None:
    """Refuse genes the trainer's optimizer or scheduler has no knob for."""
    genes, group, optim = set(genes), trainer.optimizer.param_groups[0], trainer.args.optim.value
    if genes & {"adam_beta1", "adam_beta2"} and "betas" not in group:
        raise ValueError(f"The adam_beta genes need an optimizer with betas; `optim={optim!r}` has none.")
    if "adam_epsilon" in genes and "eps" not in group:
        raise ValueError(f"The adam_epsilon gene needs an optimizer with eps; `optim={optim!r}` has none.")
    if "learning_rate" in genes and not hasattr(trainer.lr_scheduler, "base_lrs"):
        raise ValueError(
            f"The learning_rate gene scales the scheduler's base_lrs, which {type(trainer.lr_scheduler).__name__} "
            "lacks; use an lr_scheduler_type such as 'linear', 'cosine' or 'constant'."
        )


def express(
    trainer: Trainer,
    values: dict[str, float],
    schedule_base_lrs: list[float],
    decay: list[bool],
    custom: dict[str, Expression] | None = None,
) -> None:
    """Set every gene in `values` on `trainer`.

    The learning rate scales the user's schedule: each group's base becomes `schedule_base_lrs[i] * value /
    args.learning_rate`, so the warmup/decay shape and the shared step counter stay. Weight decay goes to the groups
    flagged in `decay`; betas and eps to every group; dropout to every dropout probability of the model; a gene of
    the user's own through its `custom` expression.
    """
    # Param-group dicts are looked up now: accelerate replaces them when it wraps the optimizer.
    for i, group in enumerate(trainer.optimizer.param_groups):
        if "weight_decay" in values and decay[i]:
            group["weight_decay"] = values["weight_decay"]
        if "adam_beta1" in values or "adam_beta2" in values:
            beta1, beta2 = group["betas"]
            group["betas"] = (values.get("adam_beta1", beta1), values.get("adam_beta2", beta2))
        if "adam_epsilon" in values:
            group["eps"] = values["adam_epsilon"]
        if "learning_rate" in values:
            scheduler = trainer.lr_scheduler
            new_base = schedule_base_lrs[i] * values["learning_rate"] / trainer.args.learning_rate
            old_base = scheduler.base_lrs[i]
            # LambdaLR recomputes lr from base_lrs each step; chainable schedulers scale the current lr.
            group["lr"] = group["lr"] * new_base / old_base if old_base else new_base
            group["initial_lr"] = scheduler.base_lrs[i] = new_base
    if "dropout" in values:
        set_dropout(trainer.model, values["dropout"])
    if "label_smoothing_factor" in values:
        # Always a LabelSmoother, even at 0, so every value computes the loss the same way.
        trainer.label_smoother = LabelSmoother(epsilon=values["label_smoothing_factor"])
    for name, expression in (custom or {}).items():
        if name in values:
            expression(trainer, values[name])


def with_cooldown(scheduler, fraction: float, total_steps: int) -> None:
    """Multiply `scheduler`'s shape by a linear decay to 0 over the last `fraction` of `total_steps` (in place).

    Every scheduler `lr_scheduler_type` builds is a `LambdaLR`; its per-step factors are what is multiplied, so the
    learning-rate gene (which sets `base_lrs`) stays the level and the user's warmup stays the start.
    """
    if not fraction:
        return
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        raise ValueError(
            f"`cooldown_fraction` multiplies a LambdaLR schedule, and {type(scheduler).__name__} is not one; use an "
            "`lr_scheduler_type` such as 'constant', 'linear' or 'cosine', or set cooldown_fraction=0."
        )
    start = total_steps * (1 - fraction)

    def cooled(shape):
        return lambda step: shape(step) * min(1.0, max(0.0, (total_steps - step) / (total_steps - start)))

    scheduler.lr_lambdas = [cooled(shape) for shape in scheduler.lr_lambdas]
    # The factor at the current step (0 at the start, or a resumed step) takes effect now.
    for group, base, shape in zip(
        scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
    ):
        group["lr"] = base * shape(scheduler.last_epoch)
