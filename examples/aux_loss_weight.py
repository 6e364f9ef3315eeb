"""A gene of your own: the clan schedules the weight of an auxiliary loss term, and the micro-batches per step.

    accelerate launch --config_file accelerate_configs/cpu_4_members.yaml examples/aux_loss_weight.py

The model is a tiny GPT-2 trained on the docstrings of Python's standard library (as in quickstart.py, no download).
Its loss has two parts: the language-model loss, plus `z_loss_weight` times the z-loss, the mean squared log of the
softmax normalizer (it keeps the logits from drifting; PaLM used it with a fixed weight of 1e-4). Nobody knows the
right weight for a new model, so the clan schedules it:

    genes={"z_loss_weight": {"value": 1e-2, "low": 1e-5, "high": 1.0, "scale": "log", "expression": "z_loss_weight"}}

The `expression` is an attribute path from the trainer: each member's `trainer.z_loss_weight` is set to its gene's
value (the clan's mean while it cooperates, since the weight changes the gradient members share), and `compute_loss`
reads it. A callable `expression(trainer, value)` works as well. `gradient_accumulation_steps` is a built-in integer
gene: each member accumulates its own number of micro-batches in the competitive window. Ranked by the plain
language-model loss, members that over-weight the z-loss fall behind.

Runs in a few minutes on 2 CPU cores; `--max_steps 12 --round_steps 6` for a smoke test.
"""

import argparse

import torch
from quickstart import byte_data, byte_gpt2, save_and_print_schedule

from clantune_hf import ClanConfig, ClanTrainer


class ZLossTrainer(ClanTrainer):
    """The language-model loss plus `z_loss_weight` times the z-loss (the clan sets `z_loss_weight`)."""

    z_loss_weight = 0.0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            z_loss = torch.logsumexp(outputs.logits.float(), dim=-1).pow(2).mean()
            loss = loss + self.z_loss_weight * z_loss
        return (loss, outputs) if return_outputs else loss


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="clan_output/aux_loss_weight")
    parser.add_argument("--max_steps", type=int, default=400)
    parser.add_argument("--round_steps", type=int, default=40)
    cli = parser.parse_args()

    train, evals = byte_data()
    model = byte_gpt2()
    genes = {
        "learning_rate": {},
        "gradient_accumulation_steps": {"low": 1, "high": 4},
        "z_loss_weight": {"value": 1e-2, "low": 1e-5, "high": 1.0, "scale": "log", "expression": "z_loss_weight"},
    }
    args = ClanConfig(
        output_dir=cli.output_dir,
        round_steps=cli.round_steps,
        duty_cycle=0.25,
        genes=genes,
        max_steps=cli.max_steps,
        learning_rate=1e-3,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=64,
        fitness_eval_samples=256,
        logging_steps=cli.round_steps,
        report_to="none",
    )
    trainer = ZLossTrainer(model=model, args=args, train_dataset=train, eval_dataset=evals)
    trainer.train()
    save_and_print_schedule(trainer)  # the z-loss weight and the micro-batches per step among the genes


if __name__ == "__main__":
    main()
