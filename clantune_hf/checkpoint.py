"""Checkpoints of a whole clan, so a killed run resumes exactly where it stopped.

The Trainer saves one model and rank 0's optimizer; a clan has one of each per member. A clan checkpoint is:

    checkpoint-N/
        model.safetensors, config.json, ...      the best member by the latest fitness: `from_pretrained` loads it
        trainer_state.json                       written last, after every member's files: marks the checkpoint whole
        rng_state_{rank}.pth                     each rank's RNG (the Trainer's own files)
        clan/clan.json                           every member's genome (bounds, values, mutation scales), the history
        clan/member-{i}/model.safetensors        member i's trainable weights and buffers
        clan/member-{i}/optimizer.pt             its optimizer state  } torch.save of plain tensors and numbers:
        clan/member-{i}/scheduler.pt             its scheduler state  } they load with `weights_only=True`
        clan/member-{i}/member.json              whether it diverged earlier in the current round
        clan/member-{i}/average.safetensors      the running mean of its weights for fitness, when the checkpoint
                                                 falls inside a round's averaging window

A member sharded over k ranks (`ranks_per_member=k`) has the same files per rank, each holding that rank's shards:
`clan/member-{i}/shard-{j}/...`. Resuming needs the same number of members and ranks per member.

Nothing here executes code on load: safetensors, JSON, and `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import safetensors.torch
import torch
from torch import nn
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .exchange import member_tensors
from .genes import Gene
from .genetics import Genome
from .members import MemberLayout, local, shard_optimizer_state

CLAN_DIR = "clan"
CLAN_NAME = "clan.json"
MEMBER_WEIGHTS = "model.safetensors"
MEMBER_OPTIMIZER = "optimizer.pt"
MEMBER_SCHEDULER = "scheduler.pt"
MEMBER_STATE = "member.json"
MEMBER_AVERAGE = "average.safetensors"
TRAINER_STATE = "trainer_state.json"


def member_dir(checkpoint: str, member: int, shard: int | None = None) -> str:
    """Where member `member` (its rank `shard`'s part, when sharded) is saved."""
    folder = os.path.join(checkpoint, CLAN_DIR, f"member-{member}")
    return folder if shard is None else os.path.join(folder, f"shard-{shard}")


def _own_dir(checkpoint: str, layout: MemberLayout) -> str:
    return member_dir(checkpoint, layout.member, layout.shard if layout.sharded else None)


def _local_state(state: dict) -> dict:
    """An optimizer state dict with this rank's shards in place of DTensors (torch.load(weights_only) loads it)."""
    return {
        **state,
        "state": {
            index: {key: local(value) if torch.is_tensor(value) else value for key, value in entries.items()}
            for index, entries in state["state"].items()
        },
    }


def save_member(
    checkpoint: str,
    layout: MemberLayout,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler,
    diverged: bool,
    average: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write this member's own state; every rank calls it for its own member. `optimizer=None` saves weights only;
    `average` is the state of its fitness weight average (see fitness.WeightAverage), saved when not empty."""
    folder = _own_dir(checkpoint, layout)
    os.makedirs(folder, exist_ok=True)
    tensors = {name: local(t).detach().contiguous().cpu() for name, t in member_tensors(model)}
    safetensors.torch.save_file(tensors, os.path.join(folder, MEMBER_WEIGHTS), metadata={"format": "pt"})
    if optimizer is not None:
        torch.save(_local_state(optimizer.state_dict()), os.path.join(folder, MEMBER_OPTIMIZER))
        torch.save(scheduler.state_dict(), os.path.join(folder, MEMBER_SCHEDULER))
    if average:
        safetensors.torch.save_file(average, os.path.join(folder, MEMBER_AVERAGE), metadata={"format": "pt"})
    with open(os.path.join(folder, MEMBER_STATE), "w") as f:
        json.dump({"member": layout.member, "diverged": diverged}, f)


def load_average(checkpoint: str, layout: MemberLayout) -> dict[str, torch.Tensor]:
    """The member's fitness weight average saved with `checkpoint`, or `{}` if it was taken outside the window."""
    path = os.path.join(_own_dir(checkpoint, layout), MEMBER_AVERAGE)
    return safetensors.torch.load_file(path, device="cpu") if os.path.isfile(path) else {}


def load_member(
    checkpoint: str, layout: MemberLayout, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler
) -> dict:
    """Make this rank's member (its shards, when sharded) the one saved in `checkpoint`: weights, buffers, optimizer
    and scheduler state. Returns the contents of its member.json."""
    member = layout.member
    folder = _own_dir(checkpoint, layout)
    for name in (MEMBER_WEIGHTS, MEMBER_OPTIMIZER, MEMBER_SCHEDULER, MEMBER_STATE):
        if not os.path.isfile(os.path.join(folder, name)):
            hint = (
                " It was saved with `save_only_model=True`, which keeps no optimizer state: load its weights with "
                "from_pretrained instead of resuming."
                if name != MEMBER_WEIGHTS and os.path.isfile(os.path.join(folder, MEMBER_WEIGHTS))
                else ""
            )
            raise ValueError(f"Cannot resume member {member}: {os.path.join(folder, name)} is missing.{hint}")
    saved = safetensors.torch.load_file(os.path.join(folder, MEMBER_WEIGHTS), device="cpu")
    own = {name: local(t) for name, t in member_tensors(model)}
    if set(saved) != set(own):
        raise ValueError(
            f"{folder} holds other tensors than this model (missing: {sorted(set(own) - set(saved))[:5]}, "
            f"unexpected: {sorted(set(saved) - set(own))[:5]}); resume with the model the clan was trained with."
        )
    with torch.no_grad():
        for name, tensor in own.items():
            tensor.copy_(saved[name])
    optimizer_state = torch.load(os.path.join(folder, MEMBER_OPTIMIZER), map_location="cpu", weights_only=True)
    optimizer.load_state_dict(optimizer_state)
    shard_optimizer_state(optimizer)
    scheduler.load_state_dict(torch.load(os.path.join(folder, MEMBER_SCHEDULER), weights_only=True))
    with open(os.path.join(folder, MEMBER_STATE)) as f:
        return json.load(f)


def save_clan(checkpoint: str, genomes: list[Genome], history: list[dict], ranks_per_member: int) -> None:
    """Write the state every rank shares: genomes and history (one writer is enough)."""
    os.makedirs(os.path.join(checkpoint, CLAN_DIR), exist_ok=True)
    state = {
        "clan_size": len(genomes),
        "ranks_per_member": ranks_per_member,
        "genomes": [[dataclasses.asdict(genome[name]) for name in sorted(genome)] for genome in genomes],
        "history": history,
    }
    with open(os.path.join(checkpoint, CLAN_DIR, CLAN_NAME), "w") as f:
        json.dump(state, f)


def load_clan(checkpoint: str, layout: MemberLayout, genes: list[str]) -> tuple[list[Genome], list[dict]]:
    """The genomes and history saved in `checkpoint`, checked against the clan that resumes them."""
    path = os.path.join(checkpoint, CLAN_DIR, CLAN_NAME)
    if not os.path.isfile(path):
        raise ValueError(
            f"{checkpoint} is not a clan checkpoint ({path} is missing); resume from one a ClanTrainer saved."
        )
    with open(path) as f:
        state = json.load(f)
    saved_ranks = state.get("ranks_per_member", 1)
    if saved_ranks != layout.ranks_per_member:
        raise ValueError(
            f"{checkpoint} holds members of {saved_ranks} rank(s) each but this run sets `ranks_per_member="
            f"{layout.ranks_per_member}`; resume with ranks_per_member={saved_ranks}."
        )
    if state["clan_size"] != layout.clan_size:
        raise ValueError(
            f"{checkpoint} holds a clan of {state['clan_size']} members but this run has {layout.clan_size}; "
            f"resume with `--num_processes {state['clan_size'] * saved_ranks}`."
        )
    genomes = [{gene["name"]: Gene(**gene) for gene in genome} for genome in state["genomes"]]
    if sorted(genomes[0]) != sorted(genes):
        raise ValueError(
            f"{checkpoint} schedules the genes {sorted(genomes[0])} but `genes` names {sorted(genes)}; resume with "
            "the genes the clan was trained with."
        )
    return genomes, state["history"]


def is_complete(checkpoint: str) -> bool:
    """A clan checkpoint that every rank finished writing (rank 0 writes trainer_state.json last)."""
    return os.path.isfile(os.path.join(checkpoint, TRAINER_STATE)) and os.path.isfile(
        os.path.join(checkpoint, CLAN_DIR, CLAN_NAME)
    )


def last_checkpoint(output_dir: str) -> str | None:
    """The newest complete clan checkpoint in `output_dir`: one a kill interrupted while it was written is skipped."""
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    steps = sorted(
        (int(m.group(1)), name)
        for name in (os.listdir(output_dir) if os.path.isdir(output_dir) else [])
        if (m := pattern.match(name)) and is_complete(os.path.join(output_dir, name))
    )
    return os.path.join(output_dir, steps[-1][1]) if steps else None
