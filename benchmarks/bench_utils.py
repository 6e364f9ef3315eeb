"""What both benchmarks share: a launcher that forks N real CPU ranks, tiny models, data made locally, and an
unsharded loss that scores every method the same way.

Nothing here downloads. Every dataset is generated from a seed inside the process that uses it, so the ranks of a
clan and the single-process baselines see the same bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
import site
import socket
import sys
import time
import traceback

import torch
from torch.utils.data import Dataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    default_data_collator,
    get_scheduler,
)

VOCAB = 32


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- Launching ----


def _rank_main(index: int, fn, num_processes: int, port: int, log_path: str | None, args: tuple) -> None:
    """One rank: the environment torchrun would give it, one share of the CPU cores, its own log file."""
    if num_processes > 1:
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(index),
            LOCAL_RANK=str(index),
            WORLD_SIZE=str(num_processes),
            LOCAL_WORLD_SIZE=str(num_processes),
            GLOO_SOCKET_IFNAME="lo",
        )
    threads = 1
    os.environ["OMP_NUM_THREADS"] = str(threads)
    # The environment variable is read once per process, before the fork: without this, N forked ranks each
    # spin up all cores' worth of OpenMP threads and a 5 ms step takes seconds.
    torch.set_num_threads(threads)
    if log_path is not None:
        log = open(f"{log_path}.rank{index}", "w")
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log
    try:
        fn(*args)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            with contextlib.suppress(Exception):
                torch.distributed.destroy_process_group()
        sys.stdout.flush()


def launch(fn, num_processes: int, *args, log_path: str | None = None, timeout: float = 1800) -> None:
    """Run `fn(*args)` on `num_processes` ranks forked from this process, each with the environment torchrun sets
    (so `TrainingArguments` starts a real gloo process group), like `accelerate launch --multi_gpu` on a CPU machine.

    With one process it is a plain single-process run, still forked so every run starts from a clean accelerate
    state. Raises `RuntimeError` if a rank fails or the run exceeds `timeout` seconds.
    """
    from torch.multiprocessing import start_processes

    if log_path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    context = start_processes(
        _rank_main,
        args=(fn, num_processes, free_port(), log_path, args),
        nprocs=num_processes,
        start_method="fork",
        join=False,
    )
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                raise RuntimeError(f"run did not finish within {timeout:.0f} s")
    except Exception as error:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
        raise RuntimeError(f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}") from error


def log_tail(log_path: str, lines: int = 20) -> str:
    """The last lines of rank 0's log (for a failed run's error message), its paths made portable: results are
    committed and shared, and a traceback's absolute paths name a checkout and an interpreter no reader has."""
    try:
        with open(f"{log_path}.rank0") as f:
            return portable_paths("".join(f.readlines()[-lines:]))
    except OSError:
        return ""


def portable_paths(text: str) -> str:
    """`text` with this checkout's root dropped (paths become relative to it) and the interpreter's directories named
    `<site-packages>/` and `<python>/`."""
    roots = {os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep: ""}
    roots.update({path + os.sep: "<site-packages>/" for path in site.getsitepackages() + [site.getusersitepackages()]})
    roots.update({prefix + os.sep: "<python>/" for prefix in (sys.prefix, sys.base_prefix, sys.exec_prefix)})
    for root in sorted(roots, key=len, reverse=True):  # the longest first: site-packages lies inside the prefix
        text = text.replace(root, roots[root])
    return text


def write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


# ---- Data, made locally ----


def markov_table(seed: int, alpha: float = 0.2, vocab: int = VOCAB) -> torch.Tensor:
    """A first-order Markov chain over `vocab` tokens whose rows are peaked (small Dirichlet `alpha`)."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.distributions.Gamma(torch.full((vocab, vocab), alpha), 1.0)
    # Gamma sampling has no generator argument: draw it under a fixed global seed, then restore the state.
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
        w = weights.sample() + 1e-6
    return w / w.sum(-1, keepdim=True)


def mixed_table(base: torch.Tensor, seed: int, fraction: float) -> torch.Tensor:
    """`base` with a `fraction` of its rows replaced by rows of a fresh table: a related but shifted language."""
    other = markov_table(seed)
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(base), generator=g)[: int(fraction * len(base))]
    table = base.clone()
    table[rows] = other[rows]
    return table


class MarkovText(Dataset):
    """Causal-LM sequences sampled from a Markov chain: the loss floor is the chain's entropy rate."""

    def __init__(self, table: torch.Tensor, size: int, seed: int, seq_len: int = 32):
        g = torch.Generator().manual_seed(seed)
        x = torch.empty(size, seq_len, dtype=torch.long)
        x[:, 0] = torch.randint(0, len(table), (size,), generator=g)
        for t in range(1, seq_len):
            x[:, t] = torch.multinomial(table[x[:, t - 1]], 1, generator=g).squeeze(1)
        self.input_ids = x

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.input_ids[i]}


class BagOfTokens(Dataset):
    """Random token sequences scored by a fixed linear bag-of-tokens rule.

    `kind="classify"`: label 1 when the score is positive, each label flipped with probability `noise`. The rule's
    token weights do not average to zero, so ~90% of the labels are 0; `balanced=True` centers them for a ~50/50
    split (a classifier judged by accuracy then cannot score well by always answering the majority class).
    `kind="regress"`: the standardized score as target, plus with probability `outlier_rate` a heavy outlier of
    size `outlier_scale` (train split only; evaluation targets are clean).
    """

    def __init__(
        self,
        size: int,
        seed: int,
        kind: str,
        seq_len: int = 16,
        noise: float = 0.0,
        outlier_rate: float = 0.0,
        outlier_scale: float = 0.0,
        balanced: bool = False,
    ):
        rule = torch.Generator().manual_seed(1234)
        weights = torch.randn(VOCAB, generator=rule)
        if balanced:
            weights = weights - weights.mean()
        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(0, VOCAB, (size, seq_len), generator=g)
        score = weights[self.input_ids].sum(-1) / (seq_len**0.5)
        if kind == "classify":
            labels = (score > 0).long()
            flip = torch.rand(size, generator=g) < noise
            self.labels = torch.where(flip, 1 - labels, labels)
        else:
            target = score / score.std()
            outlier = (torch.rand(size, generator=g) < outlier_rate).float()
            target = target + outlier * outlier_scale * torch.randn(size, generator=g)
            self.labels = target.float()

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


# ---- Tiny models, built from configs ----

_NO_SPECIAL_TOKENS = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


def tiny_gpt2(seq_len: int = 32, width: int = 32, layers: int = 2, dropout: float = 0.0, seed: int = 0):
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=seq_len, n_embd=width, n_layer=layers, n_head=2,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, **_NO_SPECIAL_TOKENS,
    )  # fmt: skip
    return causal_lm_loss(GPT2LMHeadModel(config))


def causal_lm_loss(model):
    """Name GPT-2's loss: its class name does not end in ForCausalLM, so transformers leaves `loss_type` None and
    the Trainer counts every label, not the shifted ones, in `num_items_in_batch`, scaling its eval loss by (L-1)/L."""
    model.loss_type = "ForCausalLM"
    return model


def tiny_llama(seq_len: int = 32, width: int = 32, layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=seq_len, **_NO_SPECIAL_TOKENS,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def tiny_bert(
    num_labels: int, seq_len: int = 16, width: int = 32, layers: int = 2, dropout: float = 0.0, seed: int = 0
):
    """A tiny BERT classifier (or regressor with `num_labels=1`)."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=width, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=2 * width, max_position_embeddings=seq_len, num_labels=num_labels,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
        problem_type="regression" if num_labels == 1 else None, pad_token_id=0,
    )  # fmt: skip
    return BertForSequenceClassification(config)


# ---- Scoring ----


@torch.no_grad()
def mean_loss(model: torch.nn.Module, dataset: Dataset, batch_size: int = 64) -> float:
    """The model's loss over `dataset`, weighted by sample, in one process: the same number for every method."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = default_data_collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        loss = model(**batch).loss
        total += loss.item() * len(batch["labels"])
        count += len(batch["labels"])
    model.train(was_training)
    return total / count


@torch.no_grad()
def mean_accuracy(model: torch.nn.Module, dataset: Dataset, batch_size: int = 64) -> float:
    """The classifier's accuracy over `dataset` (argmax of the logits), in one process."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(dataset), batch_size):
        batch = default_data_collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        labels = batch.pop("labels")
        correct += (model(**batch).logits.argmax(-1) == labels).sum().item()
    model.train(was_training)
    return correct / len(dataset)


def accuracy_metrics(prediction) -> dict[str, float]:
    """`compute_metrics` for a classifier: the same accuracy `mean_accuracy` scores, from an `EvalPrediction`."""
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": float((logits.argmax(-1) == prediction.label_ids).mean())}


def lr_shape(lr_scheduler_type: str, warmup_steps: int, max_steps: int, cooldown_fraction: float = 0.0) -> list[float]:
    """The multiplier a Trainer's scheduler applies to the peak learning rate at each optimizer step (a clan's: with
    its final cooldown)."""
    from clantune_hf.expression import with_cooldown

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = get_scheduler(
        lr_scheduler_type, optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps
    )
    with_cooldown(scheduler, cooldown_fraction, max_steps)
    shape = []
    for _ in range(max_steps):
        shape.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return shape
