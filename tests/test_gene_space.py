"""The `gradient_accumulation_steps` gene and genes of the user's own, on real CPU ranks, and their replay.

References: the gradient a step applies equals the gradient of the per-token mean loss over exactly the micro-batches
the member accumulated (its own count of rank 0's batches when competing; the clan's consensus count on every rank's
own batches, averaged over ranks, when cooperating); a custom gene's value is the one compute_loss sees.
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
from testing_utils import PatternDataset, run_clan, tiny_gpt2
from transformers import Trainer, TrainingArguments

from clantune_hf import ClanConfig, ClanTrainer, ScheduleReplayCallback
from clantune_hf.genetics import consensus

ACCUMULATION = "gradient_accumulation_steps"


def gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def summed_gradient(trainer, batches) -> tuple[list[torch.Tensor], int]:
    """The gradient of the token losses summed over `batches`, in this process, without a Trainer, and the token
    count a single-process Trainer with the same accumulation count normalizes it by (it counts every label unless
    it knows the model shifts them)."""
    ids = torch.cat([batch["input_ids"] for batch in batches])
    shifted = ids[:, 1:].numel()
    loss = trainer.model(input_ids=ids, labels=ids).loss * shifted
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, params)), shifted if trainer._loss_shifts_labels else ids.numel()


class CheckedClan(ClanTrainer):
    """Records each step's micro-batch count and custom gene value, and checks its gradient against the reference
    before the clip."""

    def _clip_grad_norm(self, model):
        batches = self._step_inputs[0]
        own = self.genomes[self.member]
        grads, count = summed_gradient(self, batches)
        if self._competitive:  # the per-token mean over its own micro-batches
            expected = int(own[ACCUMULATION].value)
            reference = [g / count for g in grads]
        else:  # every sharer's summed gradient at its own weights, over the sharers' tokens (a soloist: its own)
            expected = int(consensus(self.genomes, ACCUMULATION))
            alone = self._sharing.alone
            total = sum(gather(0 if alone else count))
            shared = [torch.zeros_like(g) if alone else g.clone() for g in grads]
            for g in shared:
                dist.all_reduce(g)
            reference = [g / count for g in grads] if alone else [g / total for g in shared]
        assert len(batches) == expected, (self.state.global_step, len(batches), expected)
        grads = [p.grad for p in self.model.parameters() if p.requires_grad]
        for grad, ref in zip(grads, reference, strict=True):
            assert torch.allclose(grad, ref, rtol=1e-4, atol=1e-6), (self.state.global_step, self._competitive)
        self.steps.append((self.state.global_step, self._competitive, len(batches), self.seen_weights))
        self.seen_weights = []
        return super()._clip_grad_norm(model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.seen_weights.append(self.aux_weight)
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # A second loss term the gene weighs (zero here, so the reference gradient is the plain LM loss's).
        return out


def set_aux_weight(trainer, value):
    trainer.aux_weight = value


def genes(expression):
    return {
        "learning_rate": {},
        ACCUMULATION: {"low": 1, "high": 4},
        "aux_weight": {"value": 0.5, "low": 0.0, "high": 1.0, "expression": expression},
    }


def check_gene_space(output_dir, expression):
    args = ClanConfig(output_dir=output_dir, round_steps=4, duty_cycle=0.5, max_steps=12, learning_rate=3e-3,
                      gradient_accumulation_steps=2, per_device_train_batch_size=2, per_device_eval_batch_size=16,
                      genes=genes(expression), report_to="none", disable_tqdm=True, save_strategy="steps",
                      save_steps=4, seed=3)  # fmt: skip
    CheckedClan.aux_weight = None
    trainer = CheckedClan(model=tiny_gpt2(dropout=0.0), args=args, train_dataset=PatternDataset(512),
                          eval_dataset=PatternDataset(16, 1))  # fmt: skip
    trainer.steps, trainer.seen_weights = [], []
    genomes_by_step = {}

    original_get = trainer.get_batch_samples

    def remember_genomes(*a, **k):
        out = original_get(*a, **k)
        genomes_by_step[trainer.state.global_step] = [g["aux_weight"].value for g in trainer.genomes]
        return out

    trainer.get_batch_samples = remember_genomes
    trainer.train()
    assert len(trainer.steps) == 12

    counts = gather([(step, competitive, count) for step, competitive, count, _ in trainer.steps])
    differ = 0
    for per_rank in zip(*counts, strict=True):
        step, competitive = per_rank[0][:2]
        if not competitive:
            assert len({count for _, _, count in per_rank}) == 1, f"step {step}: cooperative counts differ {per_rank}"
        differ += len({count for _, _, count in per_rank}) > 1
    assert differ, "no competitive step where members accumulated different counts: the test proves nothing"

    # The custom gene reaches compute_loss at every micro-batch of every step: the clan's mean while cooperating.
    for step, competitive, count, weights in trainer.steps:
        values = genomes_by_step[step]
        expected = values[trainer.member] if competitive else sum(values) / len(values)
        assert len(weights) == count and all(abs(w - expected) < 1e-12 for w in weights), (step, weights, expected)
    # A checkpoint was saved (its arguments pickled) even with a lambda as the expression.
    assert os.path.isfile(os.path.join(output_dir, "checkpoint-4", "training_args.bin"))


def test_accumulation_counts_and_a_custom_gene_by_attribute_path(tmp_path):
    run_clan(check_gene_space, 4, str(tmp_path), "aux_weight")


def test_a_custom_gene_by_callable_survives_checkpoints(tmp_path):
    run_clan(check_gene_space, 2, str(tmp_path), lambda trainer, value: setattr(trainer, "aux_weight", value))


class ReplayRecorder(Trainer):
    aux_weight = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.micro_batches.setdefault(self.state.global_step, []).append(self.aux_weight)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def test_replay_reproduces_accumulation_and_custom_genes(tmp_path):
    """Replay a clan's schedule in one process: each step takes the schedule's number of micro-batches and its
    custom gene value (the attribute path the clan recorded; a callable is passed to the callback)."""
    output_dir = str(tmp_path / "clan")
    run_clan(check_gene_space, 2, output_dir, "aux_weight")
    with open(os.path.join(output_dir, "clan_schedule.json")) as f:
        schedule = json.load(f)
    assert schedule["base"]["expressions"] == {"aux_weight": "aux_weight"}
    counts = {segment["genes"][ACCUMULATION] for segment in schedule["segments"]}
    assert all(count == int(count) for count in counts)

    for expressions in (None, {"aux_weight": set_aux_weight}):
        args = TrainingArguments(output_dir=str(tmp_path / "replay"), max_steps=12, learning_rate=3e-3,
                                 per_device_train_batch_size=2, gradient_accumulation_steps=4, report_to="none",
                                 save_strategy="no", disable_tqdm=True, use_cpu=True)  # fmt: skip
        trainer = ReplayRecorder(model=tiny_gpt2(dropout=0.0), args=args, train_dataset=PatternDataset(512))
        trainer.micro_batches = {}
        replay = ScheduleReplayCallback.from_file(output_dir, trainer, expressions)
        trainer.add_callback(replay)
        trainer.train()
        assert trainer.state.global_step == 12
        for step in range(12):
            genes_at = replay.genes_at(step)
            weights = trainer.micro_batches[step]
            assert len(weights) == genes_at[ACCUMULATION], (step, weights, genes_at)
            assert all(weight == genes_at["aux_weight"] for weight in weights), (step, weights, genes_at)
