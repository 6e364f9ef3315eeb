"""Tiny models and data built in-process (no downloads), shared by the tests."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB = 32
SEQ_LEN = 16


class PatternDataset(torch.utils.data.Dataset):
    """Arithmetic sequences modulo VOCAB: learnable in a few dozen steps by a two-layer model."""

    def __init__(self, size: int, seed: int = 0, seq_len: int = SEQ_LEN):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (size, 1), generator=g)
        step = torch.randint(1, 4, (size, 1), generator=g)
        self.data = (start + step * torch.arange(seq_len)) % VOCAB

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[i], "labels": self.data[i]}


class LabelDataset(torch.utils.data.Dataset):
    """Sequence classification: is the sequence increasing by 1 (label 1) or by 2 (label 0)?"""

    def __init__(self, size: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (size, 1), generator=g)
        self.labels = torch.randint(0, 2, (size,), generator=g)
        step = 2 - self.labels[:, None]
        self.data = (start + step * torch.arange(SEQ_LEN)) % VOCAB

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[i], "labels": self.labels[i]}


def tiny_gpt2(dropout: float = 0.1) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ_LEN, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def tiny_llama(attention_dropout: float = 0.0) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=SEQ_LEN, attention_dropout=attention_dropout,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def tiny_bert_classifier() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=SEQ_LEN, num_labels=2,
    )  # fmt: skip
    return BertForSequenceClassification(config)


def count_clone_bytes() -> list[int]:
    """From now on in this (forked) rank's process, each clone it sends appends its bytes to the list returned."""
    import clantune_hf.rounds

    sent = []
    send_member = clantune_hf.rounds.send_member

    def counting_send_member(model, optimizer, dst, extra=()):
        sent.append(send_member(model, optimizer, dst, extra))
        return sent[-1]

    clantune_hf.rounds.send_member = counting_send_member
    return sent


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _then_wait_for_all(function, *args) -> None:
    """Run `function(*args)`, then wait for every rank: a rank that returns (or exits) while a peer is still
    connecting a process group it belongs to would otherwise break that peer's connection."""
    import torch.distributed as dist

    function(*args)
    if dist.is_initialized():
        dist.barrier()


def run_clan(function, num_processes: int, *args, timeout: float = 300) -> None:
    """Run `function(*args)` on `num_processes` CPU ranks, like `accelerate.debug_launcher` but on a free port so
    several test sessions can run side by side. A failing rank fails the call (the others are terminated); a clan
    still running after `timeout` seconds is killed and fails the call, so a hang fails a test instead of CI."""
    import tempfile
    import time

    from accelerate.utils import PrepareForLaunch, patch_environment
    from torch.multiprocessing import start_processes

    with (
        tempfile.NamedTemporaryFile() as rdv,
        patch_environment(
            world_size=num_processes,
            master_addr="127.0.0.1",
            master_port=str(free_port()),
            accelerate_mixed_precision="no",
            accelerate_debug_rdv_file=rdv.name,
            accelerate_use_cpu="yes",
            gloo_socket_ifname="lo",
            omp_num_threads="1",
        ),
    ):
        context = start_processes(
            PrepareForLaunch(_then_wait_for_all, debug=True),
            args=(function, *args),
            nprocs=num_processes,
            join=False,
            start_method="fork",
        )
        deadline = time.monotonic() + timeout
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"the clan of {num_processes} did not finish within {timeout} s (hung?)")
