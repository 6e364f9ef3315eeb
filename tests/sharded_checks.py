"""Checks of a clan whose members are FSDP2-sharded over several CPU ranks (`ranks_per_member`). Each `check_*` runs
on every rank (see `run_clan`) and compares against a reference computed on the spot with an unsharded copy of the
member: the gradient a plain all-reduce gives, the member's own gradient, its eval loss on one process.
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.distributed as dist
from clan_checks import digest, gather, make_soloist, resumed_after_stop
from testing_utils import PatternDataset, tiny_gpt2
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from clantune_hf import ClanConfig, ClanTrainer
from clantune_hf.exchange import member_tensors
from clantune_hf.members import local


def full_state(model) -> dict[str, torch.Tensor]:
    """The member's full weights (a collective inside the member: every rank calls it)."""
    return {
        name: (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()
        for name, t in model.state_dict().items()
    }


def local_state(trainer: ClanTrainer) -> dict[str, torch.Tensor]:
    """This rank's shards of its member's trainable weights, buffers and optimizer state, as CPU copies."""
    state = {f"model.{n}": local(t).detach().cpu().clone() for n, t in member_tensors(trainer.model)}
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    for param, entries in trainer.optimizer.state.items():
        for key, value in entries.items():
            state[f"optim.{names[id(param)]}.{key}"] = local(value).detach().cpu().clone()
    return state


def reference_batch_losses(model, dataset, batch_size: int = 8) -> list[tuple[float, int]]:
    """The model's own loss and size of each batch, computed on one process, no Trainer."""
    model.eval()
    losses = []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {k: torch.stack([item[k] for item in items]) for k in items[0]}
            losses.append((model(**batch).loss.double().item(), len(items)))
    return losses


def reference_loss(model, dataset, batch_size: int = 8) -> float:
    """Mean over samples of the model's own loss per batch: an eval loss computed on one process, no Trainer."""
    losses = reference_batch_losses(model, dataset, batch_size)
    return sum(loss * size for loss, size in losses) / sum(size for _, size in losses)


def make_trainer(output_dir, trainer_cls=ClanTrainer, ranks_per_member: int = 2, **kwargs) -> ClanTrainer:
    defaults = dict(round_steps=4, duty_cycle=0.5, max_steps=8, learning_rate=3e-3, per_device_train_batch_size=4,
                    per_device_eval_batch_size=8, report_to="none", disable_tqdm=True, logging_steps=100,
                    genes=["learning_rate", "weight_decay", "adam_beta2"], seed=1)  # fmt: skip
    defaults.update(kwargs)
    args = ClanConfig(output_dir=output_dir, ranks_per_member=ranks_per_member, **defaults)
    return trainer_cls(
        model=tiny_gpt2(dropout=0.0), args=args, train_dataset=PatternDataset(256), eval_dataset=PatternDataset(20, 1)
    )


class GradientRecordingTrainer(ClanTrainer):
    """At every step, compares the member's gradient (before the clip) with a reference computed by an unsharded copy
    of the member on exactly the batches this rank trained on, reduced like the phase says: over all ranks when
    cooperating (DDP's all-reduce, each rank at its own member's weights), over the member's ranks when competing
    or when another member's gradient is NaN. Rank `nan_rank` turns its loss NaN at step `nan_step`."""

    steps: list[dict]
    nan_rank, nan_step = -1, -1

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        weights = full_state(self.model)  # before this step's update: what the gradient is taken at
        out = super().get_batch_samples(epoch_iterator, num_batches, device)
        self.reference = copy.deepcopy(self.plain)
        self.reference.load_state_dict(weights)
        return out

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        faulty = dist.get_rank() == self.nan_rank and self.state.global_step == self.nan_step
        if faulty and model.training and model is not self.reference:
            return (out[0] * math.nan, out[1]) if return_outputs else out * math.nan
        return out

    def _check_gradients(self, model):
        batches, num_items, _ = self._step_inputs
        self.reference.train()
        params = dict(self.reference.named_parameters())
        loss = sum(self.compute_loss(self.reference, self._prepare_inputs(dict(b)), num_items_in_batch=num_items)
                   for b in batches)  # fmt: skip
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
        # Shared: the mean over the sharers' ranks (a soloist adds zeros); own: the mean over the member's ranks.
        alone, k = self._sharing.alone, self.layout.ranks_per_member
        shared = {n: torch.zeros_like(g) if alone else g.clone() for n, g in grads.items()}
        for grad in shared.values():
            dist.all_reduce(grad)
            grad.div_(self._sharing.sharers * k)
        for grad in grads.values():
            dist.all_reduce(grad, group=self.layout.member_group)
            grad.div_(k)
        if not (self._competitive or self.state.global_step == self.nan_step or alone):
            grads = shared
        super()._check_gradients(model)
        actual = {n: p.grad.full_tensor() for n, p in self.model.named_parameters() if p.grad is not None}
        self.steps.append(
            {
                "step": self.state.global_step,
                "competitive": self._competitive,
                "batch": digest(b["input_ids"] for b in batches),
                "skipped": not actual,
                "alone": alone,
                "equal": set(actual) == set(grads)
                and all(torch.allclose(actual[n], grads[n], rtol=1e-4, atol=1e-6) for n in actual),
            }
        )


def check_gradients_and_data(output_dir, accumulation: bool = False):
    """Cooperative steps: the gradient equals the all-reduce over all ranks and every rank draws its own batch.
    Competitive steps: a member's gradient is its own (its ranks' mean) and rank j of every member trains on member
    0's rank j batch. The ranks of a member express one genome. With `accumulation`, members accumulate their own
    number of micro-batches (the gradient_accumulation_steps gene) and only the gradients are checked."""
    plain = tiny_gpt2(dropout=0.0)
    genes = ["learning_rate", "gradient_accumulation_steps"] if accumulation else ["learning_rate", "weight_decay"]
    trainer = make_trainer(output_dir, GradientRecordingTrainer, genes=genes, gradient_accumulation_steps=2)
    trainer.plain, trainer.steps = plain, []
    layout = trainer.layout
    assert (layout.clan_size, layout.ranks_per_member) == (2, 2)
    assert (layout.member, layout.shard) == divmod(dist.get_rank(), 2)
    assert all(isinstance(p, DTensor) for p in trainer.model.parameters()), "a member's weights are sharded"
    trainer.train()

    assert [s["competitive"] for s in trainer.steps] == [False, False, True, True] * 2
    assert all(s["equal"] for s in trainer.steps), [(s["step"], s["competitive"], s["equal"]) for s in trainer.steps]
    lrs = gather(trainer.genomes[layout.member]["learning_rate"].value)
    assert lrs[0] == lrs[1] and lrs[2] == lrs[3], "the ranks of a member express one genome"
    if accumulation:
        counts = gather(trainer.genomes[layout.member]["gradient_accumulation_steps"].value)
        assert counts[0] == counts[1] and counts[2] == counts[3], counts
        return
    batches = gather([s["batch"] for s in trainer.steps])
    for i, s in enumerate(trainer.steps):
        seen = [b[i] for b in batches]
        if s["competitive"]:
            assert seen[0] == seen[2] and seen[1] == seen[3] and seen[0] != seen[1], seen
        else:
            assert len(set(seen)) == 4, "cooperative steps: every rank its own shard of the data"


def check_soloist(output_dir):
    """3 members of 2 ranks, the last one's learning rate far from the others' (`solo_radius`): while the clan
    cooperates it trains on its own gradient, and the other two share the mean of theirs."""
    trainer = make_trainer(
        output_dir, GradientRecordingTrainer, duty_cycle=0.0, round_steps=3, max_steps=3, initial_spread="local",
        genes=["learning_rate"], solo_radius=0.25,
    )  # fmt: skip
    trainer.plain, trainer.steps = tiny_gpt2(dropout=0.0), []
    far = make_soloist(trainer)
    trainer.train()
    assert trainer.steps and all(s["alone"] == (trainer.member == far) for s in trainer.steps), trainer.steps
    assert all(s["equal"] for s in trainer.steps), [(s["step"], s["equal"]) for s in trainer.steps]


def check_nan_member(output_dir):
    """One rank of member 1 turns NaN in a cooperative step: the whole of member 1 skips its update, member 0
    applies its own gradient only (the mean over the healthy members), member 1 ranks last and is replaced."""
    trainer = make_trainer(output_dir, GradientRecordingTrainer)
    trainer.plain, trainer.steps = tiny_gpt2(dropout=0.0), []
    trainer.nan_rank, trainer.nan_step = 3, 1
    trainer.train()
    nan_step = trainer.steps[1]
    assert nan_step["skipped"] == (trainer.member == 1), nan_step
    if trainer.member == 0:
        assert all(s["equal"] for s in trainer.steps), [(s["step"], s["equal"]) for s in trainer.steps]
    first = {r["member"]: r for r in trainer.clan_history if r["round"] == 0}
    assert first[1]["fitness"] is None and first[1]["parent"] == 0, first  # NaN is null in the history
    for p in trainer.model.parameters():
        assert torch.isfinite(local(p)).all()


class CloneRecordingTrainer(ClanTrainer):
    """Keeps this rank's shards right before and after the first selection's exchange, and each member's fitness
    next to a reference: the eval loss of an unsharded copy of the member, on one process."""

    def _gather_fitness(self, averaged=True):
        plain = copy.deepcopy(self.plain)
        plain.load_state_dict(full_state(self.model))
        self.reference_batches = [loss for loss, _ in reference_batch_losses(plain, self.eval_dataset)]
        self.reference_fitness = reference_loss(plain, self.eval_dataset)
        return super()._gather_fitness(averaged)

    def _end_round(self):
        self.before = local_state(self)
        super()._end_round()
        self.after = local_state(self)


def check_clone_fitness_and_save(output_dir):
    """A clone's shards (weights and Adam state) equal its source's bit for bit, rank j from rank j; fitness equals
    the unsharded eval loss of the member; the saved model is the best member, loads with from_pretrained and
    evaluates to the final fitness."""
    # A gate that any better mean passes: the plan is the ungated one, and the per-batch scores are gathered.
    trainer = make_trainer(
        output_dir, CloneRecordingTrainer, max_steps=8, save_strategy="no", selection_confidence=0.01
    )
    trainer.plain = tiny_gpt2(dropout=0.0)
    trainer.train()
    layout = trainer.layout

    first = [r for r in trainer.clan_history if r["round"] == 0]
    plan = {r["member"]: r["parent"] for r in first if r["parent"] is not None}
    assert plan, "a selection must replace someone"
    befores, afters = gather(trainer.before), gather(trainer.after)
    for rank in range(dist.get_world_size()):
        member, shard = divmod(rank, layout.ranks_per_member)
        source = plan.get(member, member) * layout.ranks_per_member + shard
        assert set(afters[rank]) == set(befores[source])
        for key, value in befores[source].items():
            assert torch.equal(afters[rank][key], value), f"rank {rank} differs from rank {source} at {key}"
        assert any(k.endswith(".exp_avg_sq") for k in afters[rank])

    # Fitness in the history is the unsharded eval loss of each member (the final round's too).
    final = [r for r in trainer.clan_history if r["round"] == max(r["round"] for r in trainer.clan_history)]
    references = gather(trainer.reference_fitness)[:: layout.ranks_per_member]
    for record in final:
        assert math.isclose(record["fitness"], references[record["member"]], rel_tol=1e-5), (record, references)
    best = min(final, key=lambda r: r["fitness"])
    # The member's loss per eval batch (the paired test's scores), its batches split between its two ranks.
    assert trainer._fitness_batches == pytest.approx(trainer.reference_batches, rel=1e-5)

    metrics = trainer.evaluate()
    assert math.isclose(metrics["eval_loss"], best["fitness"], rel_tol=1e-5), (metrics, best)
    trainer.save_model(f"{output_dir}/final")
    dist.barrier()
    saved = AutoModelForCausalLM.from_pretrained(f"{output_dir}/final")
    assert math.isclose(reference_loss(saved, trainer.eval_dataset), best["fitness"], rel_tol=1e-5)
    own = full_state(trainer.model)
    for name, value in saved.state_dict().items():
        assert torch.equal(value, own[name]), f"every member now holds the best one; {name} differs"
    with open(f"{output_dir}/final/README.md") as f:
        card = f.read()
    assert "**2 members**, each an FSDP2-sharded model over 2 processes" in card
    assert "when the stronger beat it with 1% confidence (a paired t-test over the eval batches)" in card

    # predict(): the best member's logits on every rank, in the dataset's order, as the saved model computes them.
    prediction = trainer.predict(trainer.eval_dataset)
    inputs = torch.stack([trainer.eval_dataset[i]["input_ids"] for i in range(len(trainer.eval_dataset))])
    with torch.no_grad():
        expected = saved.eval()(input_ids=inputs).logits
    assert torch.allclose(torch.as_tensor(prediction.predictions), expected, rtol=1e-4, atol=1e-5)


def check_resume(output_dir):
    """A run stopped after a checkpoint and resumed from it equals a run that was never interrupted: the history,
    every member's final shards, and the saved model."""
    settings = dict(max_steps=12, save_strategy="steps", save_steps=6, duty_cycle=0.5)
    uninterrupted = make_trainer(f"{output_dir}/a", **settings)
    uninterrupted.train()
    expected = local_state(uninterrupted)

    resumed = resumed_after_stop(make_trainer, f"{output_dir}/b", 6, **settings)
    assert resumed.clan_history == uninterrupted.clan_history
    actual = local_state(resumed)
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key

    # The checkpoint holds members of 2 ranks: a clan of 4 one-rank members cannot resume it.
    mismatched = make_trainer(f"{output_dir}/b", ranks_per_member=1, **settings)
    try:
        mismatched.train(resume_from_checkpoint=f"{output_dir}/b/checkpoint-6")
    except ValueError as error:
        assert "ranks_per_member=2" in str(error), error
    else:
        raise AssertionError("resuming with another ranks_per_member must be refused")


def check_lora(output_dir):
    """A clan of LoRA adapters over an FSDP2-sharded frozen base: the base never changes, a clone moves one member's
    adapters and Adam state (split over its rank pairs) and no base weight, and `save_model` writes the best member's
    adapter, which reloads over a fresh base to the final best fitness."""
    import peft
    from testing_utils import count_clone_bytes, tiny_llama

    sent = count_clone_bytes()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = peft.get_peft_model(tiny_llama(), config)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    args = ClanConfig(
        output_dir=output_dir, ranks_per_member=2, round_steps=3, duty_cycle=0.34, max_steps=9, learning_rate=1e-2,
        per_device_train_batch_size=4, report_to="none", disable_tqdm=True, save_strategy="no",
    )  # fmt: skip
    trainer = ClanTrainer(model=model, args=args, train_dataset=PatternDataset(96), eval_dataset=PatternDataset(16, 1))
    trainer.train()
    trainer.save_model()

    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p.full_tensor(), frozen[name]), f"frozen base weight {name} changed"
    # One clone: the adapters and their two Adam moments, once over the member's ranks; each rank adds its own
    # Adam step counters and its copy of the buffers.
    size = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
    expected = 3 * size(trainable) + 2 * (4 * len(trainable) + size(model.buffers()))
    per_rank = gather(sent)
    clones = [a + b for m in (0, 1) for a, b in zip(per_rank[2 * m], per_rank[2 * m + 1], strict=True)]
    assert clones and all(b == expected for b in clones), (clones, expected)

    dist.barrier()
    files = set(os.listdir(output_dir))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files, files
    reloaded = peft.PeftModel.from_pretrained(tiny_llama(), output_dir)
    best = trainer.clan_schedule["best_fitness"]
    assert math.isclose(reference_loss(reloaded, PatternDataset(16, 1), batch_size=16), best, rel_tol=1e-4)
