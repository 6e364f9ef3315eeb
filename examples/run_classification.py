"""Train or fine-tune a sequence classifier with a clan whose fitness is an `evaluate` metric (accuracy by default):
each member is ranked by its own model's accuracy on the validation set. Like `transformers`'
examples/pytorch/text-classification/run_classification.py, with `ClanConfig`'s fields added to the command line.

Offline on a CPU, two members: a tiny BERT built from examples/configs/tiny-bert, a word-level tokenizer fitted to the
training sentences shipped in examples/data, and accuracy measured by `evaluate` from the metric module in
examples/metrics/accuracy (about a minute on 2 cores):

    accelerate launch --config_file accelerate_configs/cpu_2_members.yaml examples/run_classification.py \
        --config_name examples/configs/tiny-bert \
        --train_file examples/data/classification_train.csv \
        --validation_file examples/data/classification_validation.csv \
        --per_device_train_batch_size 16 --learning_rate 1e-3 --max_steps 120 \
        --round_steps 20 --duty_cycle 0.25 --genes learning_rate weight_decay dropout label_smoothing_factor \
        --metric_for_best_model accuracy --output_dir runs/classification --report_to tensorboard

A model and data set from the Hub, one member per GPU:

    accelerate launch --config_file accelerate_configs/multi_gpu.yaml examples/run_classification.py \
        --model_name_or_path google-bert/bert-base-uncased --dataset_name stanfordnlp/sst2 --text_column sentence \
        --per_device_train_batch_size 32 --learning_rate 3e-5 --max_steps 2000 \
        --round_steps 200 --duty_cycle 0.08 --genes learning_rate weight_decay dropout \
        --metric_for_best_model accuracy --output_dir runs/bert-sst2 --report_to tensorboard

About the metric: `evaluate.load("accuracy")` downloads its script from the Hub, which fails offline. This script
loads `--metric_path` instead, by default the local module examples/metrics/accuracy/accuracy.py (the Hub metric's
inputs and output, computed with numpy rather than scikit-learn), through `evaluate.load` all the same. Pass
`--metric_path accuracy` (or `f1`, ...) to use the Hub's module when you are online, with a matching
`--metric_for_best_model`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import evaluate
import numpy as np
from datasets import load_dataset
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    PreTrainedTokenizerFast,
    set_seed,
)

from clantune_hf import ClanConfig, ClanTrainer

LOCAL_ACCURACY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics", "accuracy")


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
            "help": "Config (Hub id or local path) of a model trained from scratch: examples/configs/tiny-bert."
        },
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer (Hub id or local path). Defaults to the model's; a model trained from scratch without "
            "one gets a word-level tokenizer fitted to the training texts here, with no download."
        },
    )


@dataclass
class DataArguments:
    # Parameters that choose the data
    dataset_name: str | None = field(default=None, metadata={"help": "Data set on the Hub, e.g. stanfordnlp/sst2."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    train_file: str | None = field(default=None, metadata={"help": "Local training data (.csv or .json)."})
    validation_file: str | None = field(default=None, metadata={"help": "Local validation data, same format."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text to classify."})
    label_column: str = field(default="label", metadata={"help": "Column holding the label."})
    # Parameters that shape the samples and the metric
    max_seq_length: int = field(default=128, metadata={"help": "Texts are truncated to this many tokens."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first this many training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first this many validation rows."})
    metric_path: str = field(
        default=LOCAL_ACCURACY,
        metadata={
            "help": "`evaluate` module for the fitness metric: a local path (default: the shipped accuracy) or "
            "a Hub name such as 'accuracy' or 'f1'."
        },
    )


def word_level_tokenizer(texts: list[str], vocab_size: int = 5000) -> PreTrainedTokenizerFast:
    """A lower-cased word-level tokenizer fitted to `texts` in a moment, with no download, for models trained from
    scratch. Each text starts with [CLS], the token BERT-style classifiers read their prediction from."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    special = ["[PAD]", "[UNK]", "[CLS]"]
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=special))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A", special_tokens=[("[CLS]", tokenizer.token_to_id("[CLS]"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]")


def load_raw_datasets(data_args: DataArguments):
    if data_args.dataset_name is not None:
        return load_dataset(data_args.dataset_name, data_args.dataset_config_name)
    if data_args.train_file is None or data_args.validation_file is None:
        raise ValueError("Give --dataset_name, or both --train_file and --validation_file.")
    extension = data_args.train_file.rsplit(".", 1)[-1]
    return load_dataset(extension, data_files={"train": data_args.train_file, "validation": data_args.validation_file})


def main():
    parser = HfArgumentParser((ModelArguments, DataArguments, ClanConfig))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    if training_args.metric_for_best_model is None:
        training_args.metric_for_best_model, training_args.greater_is_better = "accuracy", True
    set_seed(training_args.seed)  # every member starts from the same weights

    raw = load_raw_datasets(data_args)
    label_feature = raw["train"].features[data_args.label_column]
    label_names = getattr(label_feature, "names", None) or sorted(raw["train"].unique(data_args.label_column))
    label_to_id = {name: i for i, name in enumerate(label_names)}

    tokenizer_source = model_args.tokenizer_name or model_args.model_name_or_path
    if tokenizer_source is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    else:
        tokenizer = word_level_tokenizer(raw["train"][data_args.text_column])
    id2label = {i: str(name) for i, name in enumerate(label_names)}
    label2id = {label: i for i, label in id2label.items()}
    if model_args.model_name_or_path is not None:
        model = AutoModelForSequenceClassification.from_pretrained(
            model_args.model_name_or_path, num_labels=len(label_names), id2label=id2label, label2id=label2id
        )
    else:
        if model_args.config_name is None:
            raise ValueError("Give --model_name_or_path to fine-tune, or --config_name to train from scratch.")
        config = AutoConfig.from_pretrained(
            model_args.config_name, num_labels=len(label_names), id2label=id2label, label2id=label2id
        )
        config.update({"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id})
        model = AutoModelForSequenceClassification.from_config(config)

    def preprocess(batch):
        encoded = tokenizer(batch[data_args.text_column], truncation=True, max_length=data_args.max_seq_length)
        # ClassLabel columns already hold ids; plain columns hold the names found above.
        labels = batch[data_args.label_column]
        encoded["labels"] = labels if hasattr(label_feature, "names") else [label_to_id[label] for label in labels]
        return encoded

    with training_args.main_process_first(desc="tokenizing"):
        encoded = raw.map(preprocess, batched=True, remove_columns=raw["train"].column_names)
        # Every rank loads the metric module; the main process first, so only it copies the script into the cache.
        metric = evaluate.load(data_args.metric_path, keep_in_memory=True)
    train_dataset, eval_dataset = encoded["train"], encoded["validation"]
    if data_args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(data_args.max_train_samples, len(train_dataset))))
    if data_args.max_eval_samples is not None:
        eval_dataset = eval_dataset.select(range(min(data_args.max_eval_samples, len(eval_dataset))))

    def compute_metrics(prediction):
        # Called on each member's own predictions over the whole validation set: its fitness.
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return metric.compute(predictions=np.argmax(logits, axis=-1), references=prediction.label_ids)

    trainer = ClanTrainer(
        model=model,
        args=training_args,
        data_collator=DataCollatorWithPadding(tokenizer),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
    )
    train_result = trainer.train()
    trainer.save_model()  # the best member, with a model card showing its schedule
    trainer.log_metrics("train", train_result.metrics)

    metrics = trainer.evaluate()  # every rank holds the best member now
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    if training_args.push_to_hub:
        trainer.push_to_hub()
    if trainer.is_world_process_zero():
        print(f"Best member saved to {os.path.abspath(training_args.output_dir)}; its schedule:")
        for segment in trainer.clan_schedule["segments"]:
            genes = ", ".join(f"{name}={value:.3g}" for name, value in segment["genes"].items())
            print(f"  steps {segment['start_step']:>6}-{segment['end_step']:<6} member {segment['member']}: {genes}")
    # Leave together: a rank that exits while another still uses the process group can abort it.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
