"""A member's fitness: its own unsharded pass over the eval set, optionally at the average of its recent weights.

Runs on one rank with no collective (`Trainer.prediction_step` gathers token counts across ranks, which would hang a
clan whose members do not all evaluate), so the trainer gathers the P numbers itself afterwards.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING

import datasets
import torch
from accelerate.utils import send_to_device
from torch import nn
from torch.utils.data import DataLoader, Subset
from transformers.trainer_pt_utils import find_batch_size, nested_concat, nested_detach, nested_numpify
from transformers.trainer_utils import EvalPrediction

if TYPE_CHECKING:
    from .clan_trainer import ClanTrainer


def fitness_dataloader(trainer: ClanTrainer) -> DataLoader:
    """The whole eval set (or its first `fitness_eval_samples`), unsharded: every member sees the same data."""
    dataset, collator = trainer.eval_dataset, trainer.data_collator
    if trainer.args.fitness_eval_samples is not None:
        indices = range(min(trainer.args.fitness_eval_samples, len(dataset)))
        dataset = dataset.select(indices) if isinstance(dataset, datasets.Dataset) else Subset(dataset, indices)
    if isinstance(dataset, datasets.Dataset):
        dataset = trainer._remove_unused_columns(dataset, description="fitness")
    else:
        collator = trainer._get_collator_with_removed_columns(collator, description="fitness")
    return DataLoader(
        dataset,
        batch_size=trainer.args.eval_batch_size,
        collate_fn=collator,
        num_workers=trainer.args.dataloader_num_workers,
        pin_memory=trainer.args.dataloader_pin_memory,
    )


def member_fitness(trainer: ClanTrainer, loader: DataLoader, batches: int | None = None) -> float:
    """This member's fitness: its eval loss (mean over samples) or `metric_for_best_model` from compute_metrics."""
    model = trainer.model
    was_training = model.training
    model.eval()
    # Members compete on the plain loss, not on their own label smoothing.
    smoother, trainer.label_smoother = trainer.label_smoother, None
    ignore_keys = getattr(model.config, "keys_to_ignore_at_inference", []) if hasattr(model, "config") else []
    total = torch.zeros((), dtype=torch.float64, device=trainer.args.device)
    samples = 0
    predictions = labels = None
    try:
        for inputs in itertools.islice(loader, batches):
            inputs = trainer._prepare_inputs(inputs)
            label_ids = nested_detach(tuple(inputs.get(name) for name in trainer.label_names))
            with torch.no_grad(), trainer.compute_loss_context_manager():
                loss, outputs = trainer.compute_loss(model, inputs, return_outputs=True)
            batch_size = find_batch_size(inputs)
            samples += batch_size
            total += loss.detach().double() * batch_size
            if trainer.fitness_metric:
                logits = tuple(v for k, v in outputs.items() if k not in ignore_keys + ["loss"])
                logits = logits[0] if len(logits) == 1 else logits
                label_ids = label_ids[0] if len(label_ids) == 1 else label_ids
                if trainer.preprocess_logits_for_metrics is not None:
                    logits = trainer.preprocess_logits_for_metrics(logits, label_ids)
                logits, label_ids = send_to_device((logits, label_ids), "cpu")
                predictions = logits if predictions is None else nested_concat(predictions, logits, -100)
                labels = label_ids if labels is None else nested_concat(labels, label_ids, -100)
    finally:
        trainer.label_smoother = smoother
        model.train(was_training)
    eval_loss = (total / max(samples, 1)).item()
    if not trainer.fitness_metric:
        return eval_loss
    metrics = trainer.compute_metrics(
        EvalPrediction(predictions=nested_numpify(predictions), label_ids=nested_numpify(labels))
    )
    key = trainer.fitness_metric.removeprefix("eval_")
    if key not in metrics:
        raise ValueError(
            f"`metric_for_best_model={trainer.fitness_metric!r}` is not among the keys compute_metrics returned "
            f"({sorted(metrics)}); set it to one of them."
        )
    return float(metrics[key])


class WeightAverage:
    """The running mean of a member's trainable weights over the last steps of a round.

    Selection on one round's raw weights is greedy: a member with a large learning rate oscillates across its valley
    and looks worse now than it will be once its rate decays (short-horizon bias). The mean of its recent weights
    sits nearer the valley floor, much as a cooldown would put it, at the cost of one copy of the trainable weights
    and one fused update per averaged step. Fitness is measured with the mean swapped in; training never sees it.
    """

    def __init__(self) -> None:
        self.mean: list[torch.Tensor] | None = None
        self.count = 0

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
        torch._foreach_lerp_(self.mean, params, 1.0 / self.count)

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
        """For a checkpoint taken inside the averaging window; empty outside it."""
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
