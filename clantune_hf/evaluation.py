"""What a member's evaluation measures, and what `ClanTrainer.evaluate` / `predict` report.

A member is evaluated on the whole dataset, unsharded, on its own weights: `Trainer.evaluate` would shard the data
across ranks and so blend P different models into one number. The loss is the model's own loss on each batch,
averaged over samples, as one process evaluating the saved model would compute it (no token count gathered across
ranks, no label smoothing). `evaluate_member` involves no other member, so a fitness pass cannot hang a clan whose
members do not all evaluate; `evaluate_clan` then gathers every member's metrics.

A member sharded over k ranks splits the batches among its ranks (batch b to rank b mod k) and sums their results
inside the member, so its pass is k times shorter and its numbers those of the unsharded pass. Its ranks stay in
step: in each group of k batches every rank runs one forward (FSDP2 gathers the weights for it from all k), a rank
left without a batch of its own runs the group's first one again and discards it.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import datasets
import torch
import torch.distributed as dist
from accelerate.utils import send_to_device
from torch.utils.data import DataLoader, Dataset, Subset
from transformers.trainer_pt_utils import find_batch_size, nested_concat, nested_detach, nested_numpify
from transformers.trainer_utils import EvalPrediction, denumpify_detensorize, speed_metrics

from .genetics import rank_members
from .history import latest_best, member_prefix
from .members import MemberLayout, reshard

if TYPE_CHECKING:
    from .clan_trainer import ClanTrainer


@dataclass
class MemberEvaluation:
    """One member's pass over a dataset. `metrics` has no prefix: `loss` (when the data has labels) and whatever
    compute_metrics returned."""

    metrics: dict[str, float]
    num_samples: int
    num_batches: int
    predictions: Any = None
    label_ids: Any = None
    # With `per_batch=True`: the same metrics for each batch alone, in batch order (the fitness's paired test).
    batches: list[dict[str, float]] | None = None


def unsharded_dataloader(trainer: ClanTrainer, dataset: Dataset, limit: int | None = None) -> DataLoader:
    """`dataset` (or its first `limit` samples) in order, the same on every rank."""
    collator = trainer.data_collator
    if limit is not None:
        indices = range(min(limit, len(dataset)))
        dataset = dataset.select(indices) if isinstance(dataset, datasets.Dataset) else Subset(dataset, indices)
    if isinstance(dataset, datasets.Dataset):
        dataset = trainer._remove_unused_columns(dataset, description="evaluation")
    else:
        collator = trainer._get_collator_with_removed_columns(collator, description="evaluation")
    return DataLoader(
        dataset,
        batch_size=trainer.args.eval_batch_size,
        collate_fn=collator,
        num_workers=trainer.args.dataloader_num_workers,
        pin_memory=trainer.args.dataloader_pin_memory,
    )


def evaluate_member(
    trainer: ClanTrainer,
    loader: DataLoader,
    batches: int | None = None,
    ignore_keys: list[str] | None = None,
    compute_metrics: bool = True,
    keep_predictions: bool = False,
    per_batch: bool = False,
) -> MemberEvaluation:
    """This rank's member on `loader` (its first `batches` batches): loss, compute_metrics, and the predictions;
    with `per_batch`, also each batch's own loss and compute_metrics."""
    model = trainer.model
    was_training = model.training
    model.eval()
    # The model's own loss, not the member's label smoothing: what a user evaluating the saved model measures.
    smoother, trainer.label_smoother = trainer.label_smoother, None
    if ignore_keys is None:
        ignore_keys = getattr(getattr(model, "config", None), "keys_to_ignore_at_inference", None) or []
    score = compute_metrics and trainer.compute_metrics is not None
    layout = trainer.layout
    # Loss sum, labelled samples, samples, batches: summed over the member's ranks at the end.
    totals = torch.zeros(4, dtype=torch.float64, device=trainer.args.device)
    outputs_by_batch = []  # (batch index, logits, label ids) of this rank's batches
    loss_indices, batch_losses = [], []  # this rank's labelled batches and their mean losses (on the device)
    try:
        for index, inputs in _own_batches(itertools.islice(loader, batches), layout.ranks_per_member, layout.shard):
            inputs = trainer._prepare_inputs(inputs)
            has_labels = bool(trainer.label_names) and all(inputs.get(k) is not None for k in trainer.label_names)
            label_ids = nested_detach(tuple(inputs.get(name) for name in trainer.label_names)) if has_labels else None
            batch_size = find_batch_size(inputs)
            with torch.no_grad(), trainer.compute_loss_context_manager():
                if has_labels:
                    loss, outputs = trainer.compute_loss(model, inputs, return_outputs=True)
                else:
                    outputs = model(**inputs)
            if index is None:  # a forward only to keep step with the member's other ranks
                continue
            if has_labels:
                totals[0] += loss.detach().double() * batch_size
                totals[1] += batch_size
                if per_batch:
                    loss_indices.append(index)
                    batch_losses.append(loss.detach().double())
            totals[2] += batch_size
            totals[3] += 1
            if not (score or keep_predictions):
                continue
            if isinstance(outputs, dict):
                logits = tuple(v for k, v in outputs.items() if k not in [*ignore_keys, "loss"])
            else:
                logits = tuple(outputs[1:] if has_labels else outputs)
            logits = logits[0] if len(logits) == 1 else logits
            if label_ids is not None and len(label_ids) == 1:
                label_ids = label_ids[0]
            if trainer.preprocess_logits_for_metrics is not None:
                logits = trainer.preprocess_logits_for_metrics(logits, label_ids)
            outputs_by_batch.append((index, *send_to_device((nested_detach(logits), label_ids), "cpu")))
    finally:
        trainer.label_smoother = smoother
        model.train(was_training)
        if layout.sharded:
            reshard(model)
    # One device sync for all the batch losses, not one per batch.
    losses_by_batch = list(zip(loss_indices, torch.stack(batch_losses).tolist(), strict=True)) if batch_losses else []
    if layout.sharded:
        dist.all_reduce(totals, group=layout.member_group)
        if score or keep_predictions:
            outputs_by_batch = _gather_in_member(outputs_by_batch, layout)
        if per_batch:
            losses_by_batch = _gather_in_member(losses_by_batch, layout)
    predictions = labels = None
    for _, logits, label_ids in outputs_by_batch:
        predictions = logits if predictions is None else nested_concat(predictions, logits, -100)
        if label_ids is not None:
            labels = label_ids if labels is None else nested_concat(labels, label_ids, -100)
    predictions, labels = (None if t is None else nested_numpify(t) for t in (predictions, labels))
    total, labelled, samples, steps = totals.tolist()
    metrics = {}
    if score and predictions is not None:
        metrics = denumpify_detensorize(
            trainer.compute_metrics(EvalPrediction(predictions=predictions, label_ids=labels))
        )
    if labelled:
        metrics["loss"] = total / labelled
    evaluation = MemberEvaluation(metrics, int(samples), int(steps), predictions if keep_predictions else None, labels)
    if per_batch:
        evaluation.batches = _batch_metrics(trainer, losses_by_batch, outputs_by_batch if score else [])
    return evaluation


def _gather_in_member(items: list[tuple], layout: MemberLayout) -> list[tuple]:
    """`(batch index, ...)` items of every rank of this rank's member, in batch order."""
    parts = [None] * layout.ranks_per_member
    dist.all_gather_object(parts, items, group=layout.member_group)
    return sorted((item for part in parts for item in part), key=lambda item: item[0])


def _batch_metrics(trainer: ClanTrainer, losses: list[tuple], outputs: list[tuple]) -> list[dict[str, float]]:
    """Each batch's loss and compute_metrics, in batch order. A metric that one batch alone cannot define (a ROC AUC
    on a batch of one class raises ValueError; a metric written for the whole set may assert its size) is left out of
    that batch, so the paired test skips the batch instead of the run failing on a statistic the user never asked
    for; the same compute_metrics on the whole set (the fitness) still raises. Every batch keeps its entry, so every
    member's list lines up with every other's."""
    by_index: dict[int, dict[str, float]] = {index: {"loss": loss} for index, loss in losses}
    for index, logits, label_ids in outputs:
        entry = by_index.setdefault(index, {})
        logits, label_ids = (None if t is None else nested_numpify(t) for t in (logits, label_ids))
        try:
            scored = trainer.compute_metrics(EvalPrediction(predictions=logits, label_ids=label_ids))
        except Exception:  # noqa: BLE001 - a batch alone only feeds the paired test
            continue
        entry.update(denumpify_detensorize(scored))
    return [by_index[index] for index in sorted(by_index)]


def _own_batches(batches: Iterable, ranks: int, shard: int) -> Iterator[tuple[int | None, Any]]:
    """`(index, batch)` of the batches this rank of a member evaluates, one per group of `ranks` batches; the index
    is None for a batch run only to keep the member's ranks in step. All of them when a member is one rank."""
    for start, group in enumerate(_groups(batches, ranks)):
        if shard < len(group):
            yield start * ranks + shard, group[shard]
        else:
            yield None, group[0]


def _groups(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while group := list(itertools.islice(iterator, size)):
        yield group


def evaluate_clan(
    trainer: ClanTrainer,
    dataset: Dataset,
    ignore_keys: list[str] | None,
    prefix: str,
    keep_predictions: bool = False,
) -> tuple[dict[str, float], MemberEvaluation]:
    """Every member evaluated on its own weights; called by every rank.

    Returns the metrics to report and the best member's evaluation (its predictions, on every rank, when
    `keep_predictions`). The best member is the one this evaluation ranks first by the clan's fitness key; its
    metrics are `{prefix}_*`, and every member's are also under `{prefix}_clan/member_{i}/*`.
    """
    start = time.time()
    own = evaluate_member(
        trainer, unsharded_dataloader(trainer, dataset), ignore_keys=ignore_keys, keep_predictions=keep_predictions
    )
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, own.metrics)
    every = trainer.layout.per_member(every)
    key = (trainer.fitness_metric or "loss").removeprefix("eval_")
    if all(key in metrics for metrics in every):
        best = rank_members([float(m[key]) for m in every], trainer.greater_is_better)[0]
    else:  # e.g. data without labels: the clan's best at its last selection
        best = latest_best(trainer.clan_history, trainer.greater_is_better) if trainer.clan_history else 0
    metrics = {f"{prefix}_{name}": value for name, value in every[best].items()}
    metrics.update(speed_metrics(prefix, start, num_samples=own.num_samples, num_steps=own.num_batches))
    metrics[f"{prefix}_clan/best_member"] = best
    for member, member_metrics in enumerate(every):
        key_prefix = f"{prefix}_{member_prefix(member, len(every))}"
        metrics.update({f"{key_prefix}/{k}": v for k, v in member_metrics.items()})
    if keep_predictions:
        held = [(own.predictions, own.label_ids)]
        dist.broadcast_object_list(held, src=trainer.layout.first_rank(best))
        own.predictions, own.label_ids = held[0]
    return metrics, own
