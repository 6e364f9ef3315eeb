"""Quickstart: a 4-member clan trains a tiny GPT-2 on text every Python install has, and prints its schedule.

    accelerate launch --config_file accelerate_configs/cpu_4_members.yaml examples/quickstart.py

Runs on CPU in a few minutes (no download: the text is the docstrings of Python's standard library, read with
`ast`, and the tokenizer is raw bytes). On GPUs: `--config_file accelerate_configs/multi_gpu.yaml`.
The learning rate starts deliberately low (3e-4) so the clan has something to fix.
"""

import argparse
import ast
import pathlib
import sysconfig

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from clantune_hf import ClanConfig, ClanTrainer

SEQ_LEN = 64


def stdlib_text(max_bytes: int = 600_000) -> bytes:
    """Docstrings of the standard library's modules, classes and functions, in a fixed order."""
    chunks, size = [], 0
    for path in sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and (doc := ast.get_docstring(node)):
                chunks.append(doc.encode("utf-8", "ignore") + b"\n\n")
                size += len(chunks[-1])
        if size >= max_bytes:
            break
    return b"".join(chunks)[:max_bytes]


class ByteBlocks(torch.utils.data.Dataset):
    """Fixed-length blocks of bytes: token ids 0-255, labels = inputs (the model shifts them)."""

    def __init__(self, data: bytes):
        ids = torch.tensor(list(data), dtype=torch.long)
        self.blocks = ids[: len(ids) // SEQ_LEN * SEQ_LEN].view(-1, SEQ_LEN)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def byte_data() -> tuple[ByteBlocks, ByteBlocks]:
    """The training and eval blocks: the first 95% of the text and the rest."""
    text = stdlib_text()
    split = len(text) * 19 // 20
    return ByteBlocks(text[:split]), ByteBlocks(text[split:])


def byte_gpt2() -> GPT2LMHeadModel:
    """A tiny GPT-2 over bytes, the same initialization every run."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=256, n_positions=SEQ_LEN, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="clan_output/quickstart")
    parser.add_argument("--max_steps", type=int, default=600)
    parser.add_argument("--round_steps", type=int, default=50)
    cli = parser.parse_args()

    train, evals = byte_data()
    model = byte_gpt2()
    args = ClanConfig(
        output_dir=cli.output_dir,
        round_steps=cli.round_steps,
        duty_cycle=0.2,
        genes=["learning_rate", "weight_decay", "dropout"],
        max_steps=cli.max_steps,
        learning_rate=3e-4,
        lr_scheduler_type="constant",
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        fitness_eval_samples=256,
        logging_steps=cli.round_steps,
        report_to="none",
    )
    trainer = ClanTrainer(model=model, args=args, train_dataset=train, eval_dataset=evals)
    trainer.train()
    save_and_print_schedule(trainer)


def save_and_print_schedule(trainer: ClanTrainer) -> None:
    """Save the best member to `output_dir`, leave the process group, and print the discovered schedule."""
    output_dir = trainer.args.output_dir
    trainer.save_model(output_dir)
    # Leave the process group together: a rank exiting while another still saves can abort it.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()

    if trainer.is_world_process_zero():
        schedule = trainer.clan_schedule
        genes = list(schedule["segments"][0]["genes"])
        best, loss = schedule["best_member"], schedule["best_fitness"]
        print(f"\nDiscovered schedule (best member {best}, eval loss {loss:.4f}):")
        print("| steps | " + " | ".join(genes) + " |")
        print("|---" * (len(genes) + 1) + "|")
        for segment in schedule["segments"]:
            values = " | ".join(f"{segment['genes'][g]:.3g}" for g in genes)
            print(f"| {segment['start_step']}-{segment['end_step']} | {values} |")
        print(f"\nBest member saved to {output_dir}; history in {output_dir}/clan_history.jsonl")


if __name__ == "__main__":
    main()
