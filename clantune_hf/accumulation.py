"""A member's own number of micro-batches per optimizer step (the `gradient_accumulation_steps` gene).

The Trainer's loop asks `get_batch_samples` for `args.gradient_accumulation_steps` micro-batches (fewer at the end of
an epoch), calls `training_step` once per item it gets back, syncs gradients at the last item and steps the
optimizer after it. A member that accumulates its own count k hands the loop the k micro-batches as exactly as many
*slots* as it asked for, so the sync and the step still come at the last slot: empty slots go in front when k is
smaller, and the last slot holds the rest when k is larger. `training_step` runs each slot's micro-batches and
divides each one's loss by k.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

GENE = "gradient_accumulation_steps"


def to_slots(batches: list[dict], slots: int) -> list[Any]:
    """`batches` as `slots` items for the Trainer's loop (none when there are no batches left)."""
    if not batches:
        return []
    if len(batches) <= slots:
        return [{} for _ in range(slots - len(batches))] + batches
    return [*batches[: slots - 1], list(batches[slots - 1 :])]


def micro_batches(slot: Any) -> list[dict]:
    """The micro-batches one slot holds: none, one, or several."""
    if isinstance(slot, list):
        return slot
    return [slot] if slot else []


def run_slot(
    trainer, model, slot: Any, num_items_in_batch: Any, training_step, count: int, sync: bool
) -> torch.Tensor:
    """Run `training_step` on each micro-batch of `slot`, each loss divided by the step's own `count` (when the loss
    is not normalized by `num_items_in_batch`). Gradients are all-reduced at most once per slot, at its last
    micro-batch and only when `sync` (the Trainer's own context still decides for the slot as a whole)."""
    trainer.current_gradient_accumulation_steps = max(count, 1)
    batches = micro_batches(slot)
    loss = torch.zeros((), device=trainer.args.device)
    for i, batch in enumerate(batches):
        with contextlib.nullcontext() if sync and i == len(batches) - 1 else trainer.accelerator.no_sync(model):
            loss = loss + training_step(model, batch, num_items_in_batch)
    return loss
