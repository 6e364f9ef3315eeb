"""A member's fitness: its own unsharded pass over the eval set (see evaluation.py), optionally at the average of its
recent weights. rounds.py gathers the P numbers afterwards.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers.trainer_utils import EvalPrediction

from .evaluation import evaluate_member, unsharded_dataloader

if TYPE_CHECKING:
    from .clan_trainer import ClanTrainer


def fitness_dataloader(trainer: ClanTrainer) -> DataLoader:
    """The whole eval set (or its first `fitness_eval_samples`), unsharded: every member sees the same data."""
    return unsharded_dataloader(trainer, trainer.eval_dataset, trainer.args.fitness_eval_samples)


def member_fitness(
    trainer: ClanTrainer, loader: DataLoader, batches: int | None = None, per_batch: bool = False
) -> tuple[float, list[float] | None]:
    """This member's fitness: its eval loss (mean over samples) or `metric_for_best_model` from compute_metrics;
    with `per_batch`, also the same number for each eval batch alone (for selection's paired test)."""
    evaluation = evaluate_member(
        trainer, loader, batches, compute_metrics=trainer.fitness_metric is not None, per_batch=per_batch
    )
    key = trainer.fitness_metric.removeprefix("eval_") if trainer.fitness_metric else "loss"
    if trainer.fitness_metric and key not in evaluation.metrics:
        raise ValueError(
            f"`metric_for_best_model={trainer.fitness_metric!r}` is not among the keys compute_metrics returned "
            f"({sorted(set(evaluation.metrics) - {'loss'})}); set it to one of them."
        )
    scores = None
    if per_batch:
        scores = [float(batch.get(key, math.nan)) for batch in evaluation.batches]
    return float(evaluation.metrics.get(key, math.nan)), scores


def is_paired(trainer: ClanTrainer) -> bool:
    """Whether selection compares members batch by batch (`selection_confidence`, `hold_confidence`), so each
    member keeps its fitness per eval batch."""
    return trainer.args.selection_confidence > 0 or trainer.args.hold_confidence > 0


def check_fitness_metric(trainer: ClanTrainer) -> None:
    """Fail before training, not after the first round, if compute_metrics does not produce `metric_for_best_model`:
    try it on one eval batch."""
    compute_metrics = trainer.compute_metrics

    def probe(prediction: EvalPrediction) -> dict:
        try:
            return compute_metrics(prediction)
        except Exception:  # too little data for this metric (e.g. AUC on one class): the first round will tell
            return {trainer.fitness_metric.removeprefix("eval_"): math.nan}

    trainer.compute_metrics = probe
    try:
        trainer._member_fitness(batches=1)
    finally:
        trainer.compute_metrics = compute_metrics


def average_step(trainer: ClanTrainer) -> None:
    """After an optimizer step: fold the weights into the fitness EMA, or into the round's averaged tail if the step
    is in it."""
    if trainer.args.fitness_ema_steps:
        trainer._average.update(trainer.model)
        return
    window, round_steps = trainer._average_steps, trainer.args.round_steps
    if window and (trainer.state.global_step - 1) % round_steps >= round_steps - window:
        trainer._average.update(trainer.model)


class WeightAverage:
    """An average of a member's trainable weights: the plain running mean of the steps folded in (`horizon=0`,
    `fitness_average_window`: the last steps of a round), or an exponential moving average over about `horizon`
    steps (`fitness_ema_steps`: every step, kept across rounds; a plain mean until `horizon` steps are in, so the
    initial weights fade at once).

    Selection on one round's raw weights is greedy: a member with a large learning rate oscillates across its valley
    and looks worse now than it will be once its rate decays (short-horizon bias). The average of its recent weights
    sits nearer the valley floor, much as a cooldown would put it, at the cost of one copy of the trainable weights
    and one fused update per averaged step. Fitness is measured with the average swapped in; training never sees it.
    """

    def __init__(self, horizon: int = 0) -> None:
        self.mean: list[torch.Tensor] | None = None
        self.count = 0
        self.horizon = horizon

    @staticmethod
    def parameters(model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = [p.detach() for p in self.parameters(model)]
        if self.mean is None:
            self.mean, self.count = [p.clone() for p in params], 1
            return
        self.count += 1
        torch._foreach_lerp_(self.mean, params, 1.0 / min(self.count, self.horizon or self.count))

    def reset(self) -> None:
        self.mean, self.count = None, 0

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[None]:
        """Evaluate `model` at the mean (no copy: the tensors trade places, and trade back on exit)."""
        if self.mean is None:
            yield
            return
        params = self.parameters(model)
        for param, mean in zip(params, self.mean, strict=True):
            param.data, mean.data = mean.data, param.data
        try:
            yield
        finally:
            for param, mean in zip(params, self.mean, strict=True):
                param.data, mean.data = mean.data, param.data

    def state_dict(self) -> dict[str, torch.Tensor]:
        """For a checkpoint: empty when nothing is averaged (a window's average outside its window)."""
        if self.mean is None:
            return {}
        return {f"mean.{i}": t.detach().cpu().contiguous() for i, t in enumerate(self.mean)} | {
            "count": torch.tensor(self.count)
        }

    def load_state_dict(self, state: dict[str, torch.Tensor], model: nn.Module) -> None:
        self.reset()
        if not state:
            return
        params = self.parameters(model)
        self.mean = [state[f"mean.{i}"].to(p.device, p.dtype) for i, p in enumerate(params)]
        self.count = int(state["count"])
