"""Replaying a discovered schedule in a plain single-process Trainer: every optimizer step runs with the values the
schedule gives for that step, read back from the optimizer, the scheduler, the clipped gradients, the model's dropout
and the label smoother."""

import json
import math

import pytest
import torch
from testing_utils import PatternDataset, tiny_gpt2
from transformers import Trainer, TrainerCallback, TrainingArguments

from clantune_hf import ScheduleReplayCallback
from clantune_hf.dropout import dropout_sites
from clantune_hf.history import build_schedule

ROUND_STEPS, MAX_STEPS, WARMUP = 3, 9, 2

# One gene set per round for the two members; member 1 wins round 0, its clone in slot 0 wins rounds 1 and 2.
GENES = [
    {"learning_rate": 2e-3, "weight_decay": 0.05, "adam_beta1": 0.85, "adam_beta2": 0.99, "adam_epsilon": 1e-7,
     "max_grad_norm": 0.05, "dropout": 0.3, "label_smoothing_factor": 0.1},
    {"learning_rate": 5e-4, "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.95, "adam_epsilon": 1e-6,
     "max_grad_norm": 2.0, "dropout": 0.0, "label_smoothing_factor": 0.0},
    {"learning_rate": 8e-3, "weight_decay": 0.2, "adam_beta1": 0.8, "adam_beta2": 0.999, "adam_epsilon": 1e-8,
     "max_grad_norm": 0.01, "dropout": 0.15, "label_smoothing_factor": 0.25},
]  # fmt: skip


def clan_schedule() -> dict:
    loser = {**GENES[0], "learning_rate": 1e-1}
    records = [
        {"round": 0, "member": 0, "fitness": 3.0, "genes": loser, "parent": 1},
        {"round": 0, "member": 1, "fitness": 2.0, "genes": GENES[0], "parent": None},
        {"round": 1, "member": 0, "fitness": 1.5, "genes": GENES[1], "parent": None},
        {"round": 1, "member": 1, "fitness": 1.9, "genes": loser, "parent": 0},
        {"round": 2, "member": 0, "fitness": 1.0, "genes": GENES[2], "parent": None},
        {"round": 2, "member": 1, "fitness": 1.2, "genes": loser, "parent": None},
    ]
    base = {"learning_rate": 1e-3, "lr_scheduler_type": "linear", "warmup_steps": WARMUP, "genes": GENES[0]}
    return build_schedule(records, ROUND_STEPS, MAX_STEPS, greater_is_better=False, base=base)


class Recorder(TrainerCallback):
    """What the optimizer is about to use, after the Trainer clipped the gradients."""

    def __init__(self, trainer: Trainer):
        self.trainer, self.steps = trainer, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        self.steps.append(
            {
                "groups": [
                    {k: g[k] for k in ("lr", "weight_decay", "betas", "eps")} for g in trainer.optimizer.param_groups
                ],
                "lr_factor": trainer.lr_scheduler.lr_lambdas[0](state.global_step),
                "max_grad_norm": args.max_grad_norm,
                "grad_norm": torch.nn.utils.get_total_norm(grads).item(),
                "dropout": {getattr(module, name) for module, name in dropout_sites(trainer.model)},
                "label_smoothing": trainer.label_smoother.epsilon,
            }
        )


def test_replayed_run_follows_the_schedule_step_by_step(tmp_path):
    schedule = clan_schedule()
    assert [s["genes"] for s in schedule["segments"]] == GENES, "test setup: the lineage should be GENES"
    path = tmp_path / "clan_schedule.json"
    path.write_text(json.dumps(schedule))

    args = TrainingArguments(
        output_dir=str(tmp_path / "replay"),
        max_steps=MAX_STEPS,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        warmup_steps=WARMUP,
        per_device_train_batch_size=4,
        max_grad_norm=1.0,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
    )
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=PatternDataset(64))
    trainer.add_callback(ScheduleReplayCallback.from_file(tmp_path, trainer))  # a run directory works too
    recorder = Recorder(trainer)
    trainer.add_callback(recorder)
    trainer.train()

    assert len(recorder.steps) == MAX_STEPS
    for step, seen in enumerate(recorder.steps):
        genes = GENES[step // ROUND_STEPS]
        decay, no_decay = seen["groups"]
        for group in (decay, no_decay):
            expected_lr = genes["learning_rate"] * seen["lr_factor"]
            assert math.isclose(group["lr"], expected_lr, rel_tol=1e-9), (
                f"step {step}: lr {group['lr']} != {expected_lr}"
            )
            assert group["betas"] == (genes["adam_beta1"], genes["adam_beta2"]), f"step {step}: {group['betas']}"
            assert group["eps"] == genes["adam_epsilon"], f"step {step}: eps {group['eps']}"
        assert decay["weight_decay"] == genes["weight_decay"], f"step {step}: decay group {decay['weight_decay']}"
        assert no_decay["weight_decay"] == 0.0, f"step {step}: the no-decay group got {no_decay['weight_decay']}"
        assert seen["max_grad_norm"] == genes["max_grad_norm"]
        assert seen["grad_norm"] <= genes["max_grad_norm"] * (1 + 1e-4), (
            f"step {step}: {seen['grad_norm']} not clipped"
        )
        assert seen["dropout"] == {genes["dropout"]}, f"step {step}: dropout {seen['dropout']}"
        assert seen["label_smoothing"] == genes["label_smoothing_factor"]
    # The warmup really shaped the learning rate: the schedule's value is the peak, not a constant.
    assert recorder.steps[0]["lr_factor"] == 0.0 and recorder.steps[WARMUP]["lr_factor"] == 1.0
    # The tightest clip thresholds were binding, so clipping used the gene rather than args.max_grad_norm.
    assert any(math.isclose(s["grad_norm"], GENES[2]["max_grad_norm"], rel_tol=1e-3) for s in recorder.steps[6:])
    assert trainer.args.max_grad_norm == 1.0, "the user's max_grad_norm is restored after training"


def test_replay_refuses_a_schedule_it_cannot_express(tmp_path):
    schedule = clan_schedule()
    for segment in schedule["segments"]:
        segment["genes"]["batch_size"] = 8
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to="none", use_cpu=True)
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=PatternDataset(8))
    with pytest.raises(ValueError, match="batch_size"):
        ScheduleReplayCallback(schedule, trainer)


def test_cooldown_decays_the_schedule_to_zero_over_the_last_fraction():
    from clantune_hf.expression import with_cooldown

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 10))
    with_cooldown(warmup, 0.2, 100)
    factors = [warmup.lr_lambdas[0](step) for step in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == 1.0 and factors[80] == 1.0, "warmup, then stable"
    assert factors[90] == pytest.approx(0.5) and factors[100] == 0.0, "then linear to 0 over the last 20 steps"
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * factors[0])

    with pytest.raises(ValueError, match="`cooldown_fraction`"):
        with_cooldown(torch.optim.lr_scheduler.StepLR(optimizer, 10), 0.2, 100)
