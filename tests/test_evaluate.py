"""`evaluate()` and `predict()` report exact numbers of a well-defined model: during training every member's own,
with the best member's as `eval_*`; after training the saved model's, as one process evaluating it would find them.

The references here use no Trainer: one forward over the whole dataset, the per-token mean cross-entropy of a causal
LM (next-token, so the first label of each sequence is not counted) and the per-sample loss and accuracy of a
classifier. The eval sets are not a multiple of the eval batch size, so a wrongly weighted last batch shows.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from testing_utils import LabelDataset, PatternDataset, run_clan, tiny_bert_classifier, tiny_gpt2
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback

from clantune_hf import ClanConfig, ClanTrainer


def gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def accuracy(prediction):
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


@torch.no_grad()
def reference(model, dataset, kind: str) -> dict[str, float]:
    """The model's metrics on `dataset` in this one process, without a Trainer."""
    was_training = model.training
    model.eval()
    ids = torch.stack([dataset[i]["input_ids"] for i in range(len(dataset))])
    logits = model(input_ids=ids.to(model.device)).logits.float().cpu()
    model.train(was_training)
    if kind == "lm":
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        return {"loss": loss.item(), "logits": logits}
    labels = torch.stack([dataset[i]["labels"] for i in range(len(dataset))])
    return {
        "loss": F.cross_entropy(logits, labels).item(),
        "accuracy": (logits.argmax(-1) == labels).float().mean().item(),
        "logits": logits,
    }


class CheckEachEvaluation(TrainerCallback):
    """At every evaluation during training: each member's reported metrics are its own, and `eval_*` the best's."""

    def __init__(self, trainer, dataset, kind):
        self.trainer, self.dataset, self.kind, self.steps = trainer, dataset, kind, []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        own = reference(self.trainer.model, self.dataset, self.kind)
        own.pop("logits")
        every = gather(own)
        width = len(str(len(every) - 1))
        for member, expected in enumerate(every):
            for name, value in expected.items():
                reported = metrics[f"eval_clan/member_{member:0{width}d}/{name}"]
                assert math.isclose(reported, value, rel_tol=1e-5, abs_tol=1e-7), (state.global_step, member, name)
        best = metrics["eval_clan/best_member"]
        key = "accuracy" if self.kind == "classifier" else "loss"
        ranked = max if self.kind == "classifier" else min
        assert every[best][key] == ranked(m[key] for m in every), "eval_* reports the best member"
        for name, value in every[best].items():
            assert math.isclose(metrics[f"eval_{name}"], value, rel_tol=1e-5, abs_tol=1e-7)
        self.steps.append(state.global_step)


def check_evaluate(output_dir, kind):
    if kind == "lm":
        model, train, evals = tiny_gpt2(), PatternDataset(256), PatternDataset(20, 1)
        extra, auto_model = {}, AutoModelForCausalLM
    else:
        model, train, evals = tiny_bert_classifier(), LabelDataset(256), LabelDataset(20, 1)
        extra = {"metric_for_best_model": "accuracy", "greater_is_better": True}
        auto_model = AutoModelForSequenceClassification
    args = ClanConfig(output_dir=output_dir, round_steps=4, duty_cycle=0.25, max_steps=8, learning_rate=3e-3,
                      per_device_train_batch_size=4, per_device_eval_batch_size=8, eval_strategy="steps",
                      eval_steps=3, report_to="none", disable_tqdm=True, save_strategy="no", seed=1,
                      **extra)  # fmt: skip
    trainer = ClanTrainer(model=model, args=args, train_dataset=train, eval_dataset=evals,
                          compute_metrics=accuracy if kind == "classifier" else None)  # fmt: skip
    checker = CheckEachEvaluation(trainer, evals, kind)
    trainer.add_callback(checker)
    trainer.train()
    assert checker.steps == [3, 6, 8], checker.steps  # the Trainer also evaluates at the last step

    metrics = trainer.evaluate()
    trainer.save_model(output_dir)
    dist.barrier()
    saved = auto_model.from_pretrained(output_dir)
    expected = reference(saved, evals, kind)
    assert math.isclose(metrics["eval_loss"], expected["loss"], rel_tol=1e-5), (metrics["eval_loss"], expected)
    if kind == "classifier":
        assert metrics["eval_accuracy"] == pytest.approx(expected["accuracy"])
    final = [r for r in trainer.clan_history if r["round"] == 1]
    best_fitness = (max if kind == "classifier" else min)(r["fitness"] for r in final)
    assert metrics["eval_accuracy" if kind == "classifier" else "eval_loss"] == pytest.approx(best_fitness)

    prediction = trainer.predict(evals)
    assert torch.allclose(torch.as_tensor(prediction.predictions), expected["logits"], atol=1e-5)
    assert prediction.metrics["test_loss"] == pytest.approx(expected["loss"], rel=1e-5)


@pytest.mark.parametrize("num_processes", [2, 4])
def test_evaluate_is_exact_for_a_causal_lm(tmp_path, num_processes):
    run_clan(check_evaluate, num_processes, str(tmp_path), "lm")


@pytest.mark.parametrize("num_processes", [2, 4])
def test_evaluate_is_exact_for_a_classifier(tmp_path, num_processes):
    run_clan(check_evaluate, num_processes, str(tmp_path), "classifier")


def test_a_metric_one_batch_cannot_define_leaves_that_batch_out_of_the_paired_test():
    from types import SimpleNamespace

    from clantune_hf.evaluation import _batch_metrics

    def one_class_fails(prediction):
        if len(set(prediction.label_ids.tolist())) < 2:
            raise ValueError("Only one class present in y_true.")
        return {"auc": 0.75}

    trainer = SimpleNamespace(compute_metrics=one_class_fails)
    logits = torch.zeros(4, 2)
    outputs = [(0, logits, torch.tensor([0, 1, 0, 1])), (1, logits, torch.tensor([1, 1, 1, 1]))]
    batches = _batch_metrics(trainer, [(0, 0.5), (1, 0.7)], outputs)
    assert batches == [{"loss": 0.5, "auc": 0.75}, {"loss": 0.7}], "every batch keeps its place and its loss"
