"""Train or fine-tune a causal language model with a clan: every process is a member that learns its own
hyperparameter schedule. Like `transformers`' examples/pytorch/language-modeling/run_clm.py, with `ClanConfig`'s
fields (`--round_steps`, `--duty_cycle`, `--genes` ...) added to the command line.

Offline on a CPU, two members: a tiny GPT-2 built from examples/configs/tiny-gpt2, a byte-level tokenizer built in
the script, and the text shipped in examples/data (about a minute on 2 cores):

    accelerate launch --config_file accelerate_configs/cpu_2_members.yaml examples/run_clm.py \
        --config_name examples/configs/tiny-gpt2 \
        --train_file examples/data/clm_train.txt --validation_file examples/data/clm_validation.txt \
        --block_size 64 --per_device_train_batch_size 8 --learning_rate 2e-3 --max_steps 120 \
        --round_steps 20 --duty_cycle 0.25 --genes learning_rate weight_decay dropout \
        --output_dir runs/clm --report_to tensorboard

The same with LoRA adapters (a clan of adapters over one frozen base; add `--model_name_or_path` for a real base):

    accelerate launch --config_file accelerate_configs/cpu_2_members.yaml examples/run_clm.py \
        --config_name examples/configs/tiny-gpt2 \
        --train_file examples/data/clm_train.txt --validation_file examples/data/clm_validation.txt \
        --block_size 64 --learning_rate 5e-3 --max_steps 60 --round_steps 20 --lora_r 8 --output_dir runs/clm-lora

Two members of 2 CPU ranks each (4 processes; each member an FSDP2-sharded model, see `--ranks_per_member`):

    accelerate launch --config_file accelerate_configs/cpu_4_members.yaml examples/run_clm.py \
        --config_name examples/configs/tiny-gpt2 \
        --train_file examples/data/clm_train.txt --validation_file examples/data/clm_validation.txt \
        --block_size 64 --per_device_train_batch_size 8 --learning_rate 2e-3 --max_steps 60 \
        --round_steps 20 --ranks_per_member 2 --output_dir runs/clm-sharded

The schedule that clan found, replayed by one plain `Trainer` (one process, no clan; 16 = the clan's 2 x 8 global
batch):

    python examples/run_clm.py --replay_schedule runs/clm/clan_schedule.json \
        --config_name examples/configs/tiny-gpt2 \
        --train_file examples/data/clm_train.txt --validation_file examples/data/clm_validation.txt \
        --block_size 64 --per_device_train_batch_size 16 --learning_rate 2e-3 --max_steps 120 \
        --output_dir runs/clm-replay

A model and data set from the Hub, one member per GPU:

    accelerate launch --config_file accelerate_configs/multi_gpu.yaml examples/run_clm.py \
        --model_name_or_path openai-community/gpt2 \
        --dataset_name Salesforce/wikitext --dataset_config_name wikitext-2-raw-v1 \
        --block_size 512 --per_device_train_batch_size 8 --learning_rate 5e-5 --max_steps 2000 \
        --round_steps 200 --duty_cycle 0.08 --genes learning_rate weight_decay dropout --fitness_eval_samples 256 \
        --output_dir runs/gpt2-wikitext --report_to tensorboard

A model too big for one GPU: 8 GPUs as 2 members of 4 GPUs each, every member FSDP2-sharded over its 4:

    accelerate launch --config_file accelerate_configs/multi_gpu_sharded_members.yaml examples/run_clm.py \
        --model_name_or_path meta-llama/Llama-3.1-8B \
        --dataset_name Salesforce/wikitext --dataset_config_name wikitext-2-raw-v1 \
        --block_size 1024 --per_device_train_batch_size 4 --learning_rate 2e-5 --max_steps 2000 --bf16 \
        --ranks_per_member 4 --round_steps 200 --genes learning_rate weight_decay --fitness_eval_samples 256 \
        --output_dir runs/llama-sharded-clan

The run ends with the best member saved in `--output_dir` (with a model card showing the discovered schedule),
`clan_history.jsonl` and `clan_schedule.json` beside it; `clantune plot OUTPUT_DIR` draws them.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from itertools import chain

from datasets import load_dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from clantune_hf import ClanConfig, ClanTrainer, ScheduleReplayCallback


@dataclass
class ModelArguments:
    # Parameters that choose the model
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Pretrained model (Hub id or local path) to fine-tune. Leave unset to train from scratch."},
    )
    config_name: str | None = field(
        default=None,
        metadata={
            "help": "Config (Hub id or local path) of a model trained from scratch: examples/configs/tiny-gpt2."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Override config fields of a model trained from scratch, e.g. 'n_embd=128,n_layer=4'."},
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer (Hub id or local path). Defaults to the model's; a model trained from scratch without "
            "one gets a byte-level tokenizer built here, with no download."
        },
    )
    # Parameters of LoRA adapters
    lora_r: int = field(
        default=0,
        metadata={"help": "Train a clan of LoRA adapters of this rank over one frozen base (0: train all weights)."},
    )
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Modules that get adapters (default: peft's choice for the model type)."},
    )
    # Reusing a discovered schedule
    replay_schedule: str | None = field(
        default=None,
        metadata={
            "help": "Train one plain Trainer (no clan, one process) that follows this clan_schedule.json step by step."
        },
    )


@dataclass
class DataArguments:
    # Parameters that choose the data
    dataset_name: str | None = field(default=None, metadata={"help": "Data set on the Hub, e.g. Salesforce/wikitext."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    train_file: str | None = field(default=None, metadata={"help": "Local training text (.txt, .csv or .json)."})
    validation_file: str | None = field(default=None, metadata={"help": "Local validation text, same format."})
    validation_split_percentage: int = field(
        default=5,
        metadata={"help": "Percentage of the training data held out for fitness when there is no validation split."},
    )
    # Parameters that shape the samples
    block_size: int | None = field(
        default=None,
        metadata={
            "help": "Tokens per training sample (the text is concatenated, then cut). Default: the model's limit."
        },
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first this many training blocks."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first this many eval blocks."})


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer with one token per byte (id = byte value) plus end-of-text and padding: any text, no download."""
    # GPT-2's printable stand-in for every byte, so the tokenizer can store its vocabulary as text.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte], extra = chr(256 + extra), extra + 1
    tokenizer = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<pad>")


def load_raw_datasets(data_args: DataArguments):
    if data_args.dataset_name is not None:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
    else:
        if data_args.train_file is None:
            raise ValueError("Give --dataset_name, or --train_file (and optionally --validation_file).")
        data_files = {"train": data_args.train_file}
        if data_args.validation_file is not None:
            data_files["validation"] = data_args.validation_file
        extension = data_args.train_file.rsplit(".", 1)[-1]
        raw = load_dataset("text" if extension == "txt" else extension, data_files=data_files)
    if "validation" not in raw:
        split = raw["train"].train_test_split(test_size=data_args.validation_split_percentage / 100, seed=0)
        raw["train"], raw["validation"] = split["train"], split["test"]
    return raw


def load_model_and_tokenizer(model_args: ModelArguments):
    tokenizer_source = model_args.tokenizer_name or model_args.model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source) if tokenizer_source else byte_level_tokenizer()
    if model_args.model_name_or_path is not None:
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
    else:
        if model_args.config_name is None:
            raise ValueError("Give --model_name_or_path to fine-tune, or --config_name to train from scratch.")
        config = AutoConfig.from_pretrained(model_args.config_name)
        if model_args.config_overrides is not None:
            config.update_from_string(model_args.config_overrides)
        bos = tokenizer.eos_token_id if tokenizer.bos_token_id is None else tokenizer.bos_token_id
        config.update({"vocab_size": len(tokenizer), "bos_token_id": bos, "eos_token_id": tokenizer.eos_token_id})
        model = AutoModelForCausalLM.from_config(config)
    if model_args.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            target_modules=model_args.lora_target_modules,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    return model, tokenizer


def main():
    # A replay is one plain Trainer run: plain TrainingArguments, without the clan's fields and checks.
    replaying = "--replay_schedule" in sys.argv
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments if replaying else ClanConfig))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    set_seed(training_args.seed)  # every member starts from the same weights

    raw = load_raw_datasets(data_args)
    model, tokenizer = load_model_and_tokenizer(model_args)
    block_size = data_args.block_size or min(tokenizer.model_max_length, model.config.max_position_embeddings, 1024)
    text_column = "text" if "text" in raw["train"].column_names else raw["train"].column_names[0]

    def tokenize(batch):
        return tokenizer([text + tokenizer.eos_token for text in batch[text_column]])

    def group_texts(batch):
        # Concatenate everything and cut it into blocks of block_size tokens; the remainder is dropped.
        joined = {key: list(chain(*batch[key])) for key in batch}
        length = len(joined["input_ids"]) // block_size * block_size
        blocks = {key: [ids[i : i + block_size] for i in range(0, length, block_size)] for key, ids in joined.items()}
        blocks["labels"] = [ids.copy() for ids in blocks["input_ids"]]
        return blocks

    with training_args.main_process_first(desc="tokenizing"):
        tokenized = raw.map(tokenize, batched=True, remove_columns=raw["train"].column_names)
        lm_datasets = tokenized.map(group_texts, batched=True)
    train_dataset, eval_dataset = lm_datasets["train"], lm_datasets["validation"]
    if data_args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(data_args.max_train_samples, len(train_dataset))))
    if data_args.max_eval_samples is not None:
        eval_dataset = eval_dataset.select(range(min(data_args.max_eval_samples, len(eval_dataset))))

    # A plain Trainer replaying a schedule is the same call with one callback more.
    trainer_cls = ClanTrainer if model_args.replay_schedule is None else Trainer
    trainer = trainer_cls(
        model=model,
        args=training_args,
        data_collator=default_data_collator,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )
    if model_args.replay_schedule is not None:
        trainer.add_callback(ScheduleReplayCallback.from_file(model_args.replay_schedule, trainer))
    train_result = trainer.train()
    trainer.save_model()  # the best member, with a model card showing its schedule
    trainer.log_metrics("train", train_result.metrics)

    metrics = trainer.evaluate()  # after a clan, every rank holds the best member
    metrics["perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    if training_args.push_to_hub:
        trainer.push_to_hub()
    if model_args.replay_schedule is None and trainer.is_world_process_zero():
        print(f"Best member saved to {os.path.abspath(training_args.output_dir)}; its schedule:")
        for segment in trainer.clan_schedule["segments"]:
            genes = ", ".join(f"{name}={value:.3g}" for name, value in segment["genes"].items())
            print(f"  steps {segment['start_step']:>6}-{segment['end_step']:<6} member {segment['member']}: {genes}")
    # Leave together: a rank that exits while another still uses the process group can abort it.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
