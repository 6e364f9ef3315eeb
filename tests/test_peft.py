"""A clan of LoRA adapters over one frozen base: clones move only the adapters and their optimizer state, the frozen
base never changes, and `save_model` writes the best member's adapter, which `PeftModel.from_pretrained` reloads."""

import json
import math
import os

import pytest
import torch
import torch.distributed as dist
from testing_utils import PatternDataset, count_clone_bytes, run_clan, tiny_llama

from clantune_hf import ClanConfig, ClanTrainer

peft = pytest.importorskip("peft")


def lora_model():
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return peft.get_peft_model(tiny_llama(), config)


def state_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def train_lora_clan(output_dir: str) -> None:
    sent = count_clone_bytes()
    model = lora_model()
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    args = ClanConfig(
        output_dir=output_dir,
        round_steps=3,
        duty_cycle=0.34,
        genes=["learning_rate", "weight_decay"],
        max_steps=9,
        learning_rate=1e-2,
        per_device_train_batch_size=8,
        report_to="none",
        save_strategy="no",
    )
    trainer = ClanTrainer(model=model, args=args, train_dataset=PatternDataset(96), eval_dataset=PatternDataset(16, 1))
    trainer.train()
    trainer.save_model()

    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[name]), f"frozen base weight {name} changed"
    # What one clone moves: every trainable tensor, its two Adam moments and step, its fitness EMA, and the model's
    # buffers.
    trainable = [p for p in model.parameters() if p.requires_grad]
    expected = 4 * state_bytes(trainable) + len(trainable) * 4 + state_bytes(model.buffers())
    full = 4 * state_bytes(model.parameters()) + len(list(model.parameters())) * 4 + state_bytes(model.buffers())
    totals = [None] * dist.get_world_size()
    dist.all_gather_object(totals, sent)
    if dist.get_rank() == 0:
        clones = [b for rank_sent in totals for b in rank_sent]
        assert clones, "no clone happened: the test cannot measure what a clone sends"
        assert all(b == expected for b in clones), f"a LoRA clone sent {clones}, expected {expected} bytes each"
        with open(os.path.join(output_dir, "bytes.json"), "w") as f:
            json.dump(
                {"lora_clone": expected, "full_clone": full, "best_fitness": trainer.clan_schedule["best_fitness"]}, f
            )


def test_lora_clan_exchanges_adapters_and_saves_the_best_one(tmp_path):
    output_dir = str(tmp_path)
    run_clan(train_lora_clan, 2, output_dir)

    with open(os.path.join(output_dir, "bytes.json")) as f:
        numbers = json.load(f)
    assert numbers["lora_clone"] < numbers["full_clone"] / 10, numbers
    files = set(os.listdir(output_dir))
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= files, files
    assert "model.safetensors" not in files, "the frozen base was saved: only the adapter should be"
    with open(os.path.join(output_dir, "README.md")) as f:
        assert "library_name: peft" in f.read()

    # The saved adapter over a fresh copy of the base reproduces the best member's final fitness (its eval loss).
    model = peft.PeftModel.from_pretrained(tiny_llama(), output_dir).eval()
    batch = torch.stack([sample["input_ids"] for sample in PatternDataset(16, 1)])
    with torch.no_grad():
        loss = model(input_ids=batch, labels=batch).loss.item()
    best = numbers["best_fitness"]
    assert math.isclose(loss, best, rel_tol=1e-4), f"reloaded adapter's eval loss {loss} != best fitness {best}"
