"""Trainer features users combine with a clan: each works on real CPU ranks, or is refused before any compute.

(The refusals themselves, `auto_find_batch_size` and `torch_compile`, are in test_config.py and test_refusals.py.)
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import time

import pytest
import torch
import torch.distributed as dist
from testing_utils import PatternDataset, run_clan, tiny_gpt2
from transformers import EarlyStoppingCallback

from clantune_hf import ClanConfig, ClanTrainer


def make_trainer(output_dir, train_dataset=None, callbacks=None, **kwargs) -> ClanTrainer:
    defaults = dict(round_steps=4, duty_cycle=0.25, max_steps=8, learning_rate=3e-3, per_device_train_batch_size=4,
                    per_device_eval_batch_size=16, report_to="none", disable_tqdm=True, save_strategy="no",
                    seed=1)  # fmt: skip
    defaults.update(kwargs)
    return ClanTrainer(
        model=tiny_gpt2(),
        args=ClanConfig(output_dir=output_dir, **defaults),
        train_dataset=PatternDataset(256) if train_dataset is None else train_dataset,
        eval_dataset=PatternDataset(16, 1),
        callbacks=callbacks,
    )


def rounds(trainer) -> int:
    return len({r["round"] for r in trainer.clan_history})


def evaluations(trainer) -> list[int]:
    return [entry["step"] for entry in trainer.state.log_history if "eval_loss" in entry]


def same_on_every_rank(value) -> bool:
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return all(v == values[0] for v in values)


def check_gradient_checkpointing(output_dir):
    trainer = make_trainer(output_dir, gradient_checkpointing=True)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert trainer.model.is_activation_checkpointing
    assert rounds(trainer) == 2 and trainer.clan_schedule is not None
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))


def check_early_stopping(output_dir):
    # Any improvement smaller than the threshold counts as none: the second evaluation (step 4) stops training.
    stop = EarlyStoppingCallback(early_stopping_patience=1, early_stopping_threshold=100.0)
    trainer = make_trainer(output_dir, callbacks=[stop], max_steps=16, eval_strategy="steps", eval_steps=2,
                           metric_for_best_model="loss")  # fmt: skip
    trainer.train()
    assert trainer.state.global_step == 4, trainer.state.global_step
    assert evaluations(trainer) == [2, 4]
    assert same_on_every_rank(trainer.state.best_metric)
    assert trainer.clan_schedule is not None and trainer.clan_schedule["segments"][-1]["end_step"] == 4


def check_epochs(output_dir):
    # 64 samples, 2 ranks x 4 per step: 8 steps an epoch, evaluated at the end of each.
    trainer = make_trainer(output_dir, train_dataset=PatternDataset(64), max_steps=-1, num_train_epochs=2,
                           eval_strategy="epoch")  # fmt: skip
    trainer.train()
    assert trainer.state.global_step == 16
    assert evaluations(trainer) == [8, 16]
    assert rounds(trainer) == 4


def check_group_by_length(output_dir):
    trainer = make_trainer(output_dir, train_sampling_strategy="group_by_length")
    trainer.train()
    assert rounds(trainer) == 2


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        data = PatternDataset(512, seed=3)
        for i in range(len(data)):
            yield data[i]


def check_iterable_dataset(output_dir):
    trainer = make_trainer(output_dir, train_dataset=Stream())
    trainer.train()
    assert trainer.state.global_step == 8 and rounds(trainer) == 2


def check_console(output_dir):
    """The console gets one compact line per round and a table at the end, not every member's scalars."""
    trainer = make_trainer(output_dir, logging_steps=4)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        trainer.train()
    if dist.get_rank() != 0:
        return
    console = out.getvalue()
    assert console.count("clan round ") == 2, console
    assert "member_" not in console, console
    assert "Clan at step 8" in console and "learning_rate" in console, console
    table = console[console.index("Clan at step 8") :].splitlines()
    assert len(table) >= 2 + dist.get_world_size(), console  # title, header, one row per member
    logged = [entry for entry in trainer.state.log_history if "clan/best_member" in entry]
    assert any("clan/member_1/fitness" in entry for entry in logged), "report_to still gets every member"


@pytest.mark.parametrize(
    "check",
    [
        check_gradient_checkpointing,
        check_early_stopping,
        check_epochs,
        check_group_by_length,
        check_iterable_dataset,
        check_console,
    ],
)
def test_combination(tmp_path, check):
    run_clan(check, 2, str(tmp_path))


def check_push_offline(output_dir):
    os.environ["HF_HUB_OFFLINE"] = "1"
    make_trainer(output_dir, push_to_hub=True, hub_model_id="someone/clan", hub_strategy="checkpoint",
                 save_strategy="steps", save_steps=4)  # fmt: skip


def test_push_to_hub_offline_fails_on_every_rank_at_once(tmp_path):
    start = time.monotonic()
    with pytest.raises(Exception, match="push_to_hub=True. but the Hub repository could not be created"):
        run_clan(check_push_offline, 2, str(tmp_path))
    assert time.monotonic() - start < 60


def check_wandb_offline(output_dir):
    os.environ.update(WANDB_MODE="offline", WANDB_DIR=output_dir, WANDB_SILENT="true")
    trainer = make_trainer(output_dir, report_to="wandb", logging_steps=4)
    trainer.train()
    assert rounds(trainer) == 2
    if dist.get_rank() == 0:
        runs = glob.glob(os.path.join(output_dir, "wandb", "offline-run-*", "run-*.wandb"))
        assert len(runs) == 1, runs  # one run for the clan, from rank 0


def test_report_to_wandb_offline(tmp_path):
    run_clan(check_wandb_offline, 2, str(tmp_path))
