"""Bad input is refused before any compute, with a ValueError that names the field (the table in docs/refusals.md).

Most refusals are ClanConfig's and run in one process; those that need the model, the data or the run's length are
ClanTrainer's and run on 2 CPU ranks.
"""

from __future__ import annotations

import pytest
import torch
from testing_utils import LabelDataset, PatternDataset, run_clan, tiny_bert_classifier, tiny_gpt2
from torch import nn

from clantune_hf import ClanConfig, ClanTrainer


def config(tmp_path, **kwargs) -> ClanConfig:
    return ClanConfig(output_dir=str(tmp_path), report_to="none", **kwargs)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        # The round
        ({"round_steps": 2.5}, "round_steps"),
        ({"round_steps": True}, "round_steps"),
        ({"round_steps": -3}, "round_steps"),
        ({"round_steps": 100, "max_steps": 50}, "round_steps"),
        ({"duty_cycle": "0.2"}, "duty_cycle"),
        ({"duty_cycle": float("nan")}, "duty_cycle"),
        ({"duty_cycle": 1.01}, "duty_cycle"),
        # Selection and fitness
        ({"selection_fraction": 0.0}, "selection_fraction"),
        ({"selection_fraction": 0.75}, "selection_fraction"),
        ({"selection_fraction": float("nan")}, "selection_fraction"),
        ({"fitness_eval_samples": 0}, "fitness_eval_samples"),
        # The search
        ({"initial_spread": "uniform"}, "initial_spread"),
        ({"step_size_control": "cma"}, "step_size_control"),
        ({"solo_center": "mean"}, "solo_center"),
        ({"resample_probability": 1.5}, "resample_probability"),
        ({"resample_probability": -0.1}, "resample_probability"),
        ({"resample_probability": "0.25"}, "resample_probability"),
        ({"mirrored_clones": "yes"}, "mirrored_clones"),
        ({"window_lr_scaling": 1}, "window_lr_scaling"),
        ({"select_in_warmup": "no"}, "select_in_warmup"),
        ({"fitness_average_window": 1.5}, "fitness_average_window"),
        ({"fitness_average_window": float("nan")}, "fitness_average_window"),
        ({"fitness_ema_steps": -1}, "fitness_ema_steps"),
        ({"fitness_ema_steps": 2.5}, "fitness_ema_steps"),
        ({"fitness_ema_steps": 12, "fitness_average_window": 0.5}, "fitness_ema_steps"),
        ({"cooldown_fraction": 1.5}, "cooldown_fraction"),
        ({"initial_spread_width": 0.0}, "initial_spread_width"),
        ({"solo_radius": 0.0}, "solo_radius"),
        ({"solo_radius": 1.5}, "solo_radius"),
        ({"solo_radius": "wide"}, "solo_radius"),
        ({"selection_confidence": 1.0}, "selection_confidence"),
        ({"selection_confidence": -0.1}, "selection_confidence"),
        ({"selection_confidence": float("nan")}, "selection_confidence"),
        ({"hold_confidence": 1.0}, "hold_confidence"),
        ({"hold_confidence": -0.5}, "hold_confidence"),
        ({"hold_confidence": "high"}, "hold_confidence"),
        ({"fitness_eval_samples": 8.5}, "fitness_eval_samples"),
        # The genes field
        ({"genes": []}, "genes"),
        ({"genes": ["learning_rate", "learning_rate"]}, "genes"),
        ({"genes": ["learning_rate", "momentum"]}, "genes"),
        ({"genes": 3}, "genes"),
        ({"genes": [3]}, "genes"),
        ({"genes": {"learning_rate": 1e-3}}, r"genes\['learning_rate'\]"),
        ({"genes": {"learning_rate": {"min": 1e-5}}}, r"genes\['learning_rate'\]"),
        ({"genes": {"learning_rate": {"scale": "exp"}}}, r"genes\['learning_rate'\]\['scale'\]"),
        ({"genes": {"learning_rate": {"low": "tiny"}}}, r"genes\['learning_rate'\]\['low'\]"),
        ({"genes": {"learning_rate": {"mutation_scale": 0}}}, r"genes\['learning_rate'\]\['mutation_scale'\]"),
        (
            {"genes": {"learning_rate": {"mutation_scale": float("inf")}}},
            r"genes\['learning_rate'\]\['mutation_scale'\]",
        ),
        ({"genes": {"learning_rate": {"low": 1e-2, "high": 1e-4}}}, r"genes\['learning_rate'\]"),
        # Bounds outside a gene's valid domain
        ({"genes": {"learning_rate": {"low": -1e-4}}}, r"genes\['learning_rate'\]\['low'\]"),
        ({"genes": {"learning_rate": {"high": float("inf")}}}, r"genes\['learning_rate'\]\['high'\]"),
        ({"genes": {"adam_beta2": {"high": 1.0}}}, r"genes\['adam_beta2'\]\['high'\]"),
        ({"genes": {"adam_beta1": {"low": -0.1}}}, r"genes\['adam_beta1'\]\['low'\]"),
        ({"genes": {"adam_epsilon": {"low": 0.0}}}, r"genes\['adam_epsilon'\]\['low'\]"),
        ({"genes": {"weight_decay": {"low": -0.01}}}, r"genes\['weight_decay'\]\['low'\]"),
        ({"genes": {"dropout": {"high": 1.0}}}, r"genes\['dropout'\]\['high'\]"),
        ({"genes": {"label_smoothing_factor": {"high": 1.5}}}, r"genes\['label_smoothing_factor'\]\['high'\]"),
        ({"genes": {"weight_decay": {"scale": "log", "low": 0.0}}}, r"genes\['weight_decay'\]"),
        # Starting values (the fields of the same name) outside a gene's domain or bounds
        ({"genes": ["learning_rate"], "learning_rate": -1e-3}, "learning_rate"),
        ({"genes": ["learning_rate"], "learning_rate": 0.0}, "learning_rate"),
        ({"genes": ["adam_beta1"], "adam_beta1": 1.0}, "adam_beta1"),
        ({"genes": ["adam_beta2"], "adam_beta2": 1.2}, "adam_beta2"),
        ({"genes": ["adam_epsilon"], "adam_epsilon": 0.0}, "adam_epsilon"),
        ({"genes": ["max_grad_norm"], "max_grad_norm": 0.0}, "max_grad_norm"),
        ({"genes": ["weight_decay"], "weight_decay": -0.1}, "weight_decay"),
        ({"genes": ["label_smoothing_factor"], "label_smoothing_factor": 1.0}, "label_smoothing_factor"),
        ({"genes": {"learning_rate": {"low": 1e-2, "high": 1e-1}}, "learning_rate": 1e-3}, "learning_rate"),
        # Settings a clan cannot run with
        ({"lr_scheduler_type": "reduce_lr_on_plateau", "eval_strategy": "steps"}, "lr_scheduler_type"),
        ({"ddp_timeout": 0}, "ddp_timeout"),
        ({"ddp_broadcast_buffers": True}, "ddp_broadcast_buffers"),
        ({"load_best_model_at_end": True, "eval_strategy": "steps", "save_strategy": "steps"}, "load_best_model"),
        ({"deepspeed": {"zero_optimization": {"stage": 2}}}, "deepspeed"),
        ({"fsdp": "full_shard"}, "fsdp"),
        ({"torch_compile": True}, "torch_compile"),
        ({"auto_find_batch_size": True}, "auto_find_batch_size"),
    ],
)
def test_config_refuses_naming_the_field(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=f"`{field}"):
        config(tmp_path, **kwargs)


def test_numbers_given_as_strings_in_a_gene_dict_are_accepted(tmp_path):
    """YAML reads `1e-5` as a string; that is a number, not a mistake."""
    args = config(tmp_path, genes={"learning_rate": {"low": "1e-5", "high": "1e-2", "mutation_scale": "0.2"}})
    assert args.genes == {"learning_rate": {"low": 1e-5, "high": 1e-2, "mutation_scale": 0.2}}


def test_eval_dataset_is_checked_before_the_trainer_starts(tmp_path):
    args = config(tmp_path, max_steps=8, round_steps=4)
    with pytest.raises(ValueError, match="`eval_dataset` is required"):
        ClanTrainer(model=tiny_gpt2(), args=args, train_dataset=PatternDataset(8))
    with pytest.raises(ValueError, match="`eval_dataset` is empty"):
        ClanTrainer(model=tiny_gpt2(), args=args, train_dataset=PatternDataset(8), eval_dataset=PatternDataset(0))
    with pytest.raises(ValueError, match="`eval_dataset` must be one dataset"):
        ClanTrainer(
            model=tiny_gpt2(), args=args, train_dataset=PatternDataset(8), eval_dataset={"a": PatternDataset(8)}
        )
    bad_metric = config(tmp_path, max_steps=8, round_steps=4, metric_for_best_model="accuracy")
    with pytest.raises(ValueError, match="`metric_for_best_model='accuracy'` needs `compute_metrics`"):
        ClanTrainer(
            model=tiny_gpt2(), args=bad_metric, train_dataset=PatternDataset(8), eval_dataset=PatternDataset(8)
        )


class NoDropoutLM(nn.Module):
    """A language model without any dropout probability (no nn.Dropout, no `*dropout` attribute)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.head = nn.Linear(16, 32)

    def forward(self, input_ids, labels=None):
        logits = self.head(self.embed(input_ids))
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 32), labels[:, 1:].reshape(-1))
        return {"loss": loss, "logits": logits}


def check_trainer_refusals(output_dir):
    """Run on every rank; each refusal fires on every rank alike, before any training step."""

    def args(**kwargs):
        base = dict(max_steps=8, round_steps=4, per_device_train_batch_size=4, disable_tqdm=True)
        return config(output_dir, **{**base, **kwargs})

    with pytest.raises(ValueError, match="`genes` includes 'dropout', but NoDropoutLM has no dropout"):
        ClanTrainer(
            NoDropoutLM(), args(genes=["dropout"]), train_dataset=PatternDataset(8), eval_dataset=PatternDataset(8)
        )

    # metric_for_best_model that compute_metrics does not produce: found on one eval batch, before the first step.
    trainer = ClanTrainer(
        tiny_bert_classifier(), args(metric_for_best_model="accuracy"), train_dataset=LabelDataset(64),
        eval_dataset=LabelDataset(16), compute_metrics=lambda p: {"acc": 0.5},
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"`metric_for_best_model='accuracy'` is not among .*\['acc'\]"):
        trainer.train()
    assert trainer.state.global_step == 0

    # ...but a compute_metrics that cannot score one batch (like AUC on a single class, or one that asserts the set's
    # size) is not refused for that: the paired test of hold_confidence scores each eval batch alone and skips it.
    def needs_the_whole_set(p):
        assert len(p.label_ids) == 16, "this metric needs all 16 samples"
        return {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}

    trainer = ClanTrainer(
        tiny_bert_classifier(), args(metric_for_best_model="accuracy", max_steps=4, per_device_eval_batch_size=8,
                                     hold_confidence=0.99),
        train_dataset=LabelDataset(64), eval_dataset=LabelDataset(16), compute_metrics=needs_the_whole_set,
    )  # fmt: skip
    trainer.train()
    assert all(r["fitness"] is not None for r in trainer.clan_history)

    # round_steps longer than a run set by epochs: 16 samples / (4 per rank * 2 ranks) = 2 steps.
    trainer = ClanTrainer(
        tiny_gpt2(), args(max_steps=-1, num_train_epochs=1), train_dataset=PatternDataset(16),
        eval_dataset=PatternDataset(8),
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"`round_steps` \(4\) is larger than the run's 2 optimizer steps"):
        trainer.train()
    assert trainer.state.global_step == 0

    # A gene the optimizer cannot express.
    trainer = ClanTrainer(
        tiny_gpt2(), args(optim="sgd", genes=["adam_beta2"]), train_dataset=PatternDataset(64),
        eval_dataset=PatternDataset(8),
    )  # fmt: skip
    with pytest.raises(ValueError, match="adam_beta genes need an optimizer with betas"):
        trainer.train()
    assert trainer.state.global_step == 0

    # A dropout gene whose configured bounds exclude the model's own dropout.
    with pytest.raises(ValueError, match=r"gene 'dropout'.*outside its bounds"):
        ClanTrainer(
            tiny_gpt2(dropout=0.1), args(genes={"dropout": {"low": 0.2, "high": 0.4}}),
            train_dataset=PatternDataset(8), eval_dataset=PatternDataset(8),
        )  # fmt: skip


def test_trainer_refuses_before_any_step(tmp_path):
    run_clan(check_trainer_refusals, 2, str(tmp_path))


def check_dynamo_backend_refused(output_dir):
    import os

    os.environ["ACCELERATE_DYNAMO_BACKEND"] = "inductor"  # what `accelerate config` writes for torch.compile
    with pytest.raises(ValueError, match="`dynamo_backend`"):
        ClanTrainer(tiny_gpt2(), config(output_dir, max_steps=8, round_steps=4), train_dataset=PatternDataset(8),
                    eval_dataset=PatternDataset(8))  # fmt: skip


def test_an_accelerate_config_that_compiles_is_refused(tmp_path):
    run_clan(check_dynamo_backend_refused, 2, str(tmp_path))


def test_a_single_process_is_refused_with_how_to_launch(tmp_path):
    with pytest.raises(ValueError, match="accelerate launch --num_processes N"):
        ClanTrainer(tiny_gpt2(), config(tmp_path), train_dataset=PatternDataset(8), eval_dataset=PatternDataset(8))


def test_resuming_from_a_missing_or_foreign_checkpoint_is_refused(tmp_path):
    run_clan(check_resume_refusals, 2, str(tmp_path))


def check_resume_refusals(output_dir):
    import os

    def trainer(**kwargs):
        args = config(output_dir, max_steps=4, round_steps=2, disable_tqdm=True, **kwargs)
        return ClanTrainer(tiny_gpt2(), args, train_dataset=PatternDataset(64), eval_dataset=PatternDataset(8))

    with pytest.raises(ValueError, match="`resume_from_checkpoint=True` found no complete clan checkpoint"):
        trainer().train(resume_from_checkpoint=True)
    # A plain Trainer checkpoint (no clan/ folder) cannot restore a clan.
    plain = os.path.join(output_dir, "plain")
    if torch.distributed.get_rank() == 0:
        tiny_gpt2().save_pretrained(plain)
    torch.distributed.barrier()
    with pytest.raises(ValueError, match="is not a clan checkpoint"):
        trainer().train(resume_from_checkpoint=plain)
    # A clan checkpoint with other genes than the run.
    trainer(save_strategy="steps", save_steps=2).train()
    with pytest.raises(ValueError, match="schedules the genes .* but `genes` names"):
        trainer(genes=["learning_rate"]).train(resume_from_checkpoint=os.path.join(output_dir, "checkpoint-2"))
    # A checkpoint whose writing was cut short: rank 0 writes trainer_state.json last.
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        os.remove(os.path.join(output_dir, "checkpoint-2", "trainer_state.json"))
    torch.distributed.barrier()
    with pytest.raises(ValueError, match="checkpoint-2 is incomplete"):
        trainer().train(resume_from_checkpoint=os.path.join(output_dir, "checkpoint-2"))


def test_fp16_from_the_accelerate_config_is_refused_like_the_field(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(ValueError, match="`fp16`"):
        config(tmp_path)
