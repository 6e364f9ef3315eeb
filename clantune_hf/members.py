"""Which ranks make up which member, and how a member of several ranks is sharded (`ClanConfig.ranks_per_member`).

With `ranks_per_member=1` (the default) every process is a member and the clan's collectives run over the default
process group. With `ranks_per_member=k > 1` the W processes form a `(W / k, k)` device mesh: member `m` is ranks
`m*k .. m*k + k-1`, its model is FSDP2-sharded over them (the mesh's `shard` dimension), and rank `j` of every
member holds the same slice of every tensor (the *peer group* `j`, along the mesh's `member` dimension). So:

- every backward reduce-scatters each layer's gradient inside the member, as FSDP2 does;
- in cooperative steps FSDP2's all-reduce hook then averages that shard over the peer group, layer by layer as the
  backward goes: together, the mean over all W ranks, as HSDP computes it (a member that trains alone keeps its
  own, see `Sharing`). In competitive steps the hook does nothing, so each member keeps its own gradient. (HSDP's
  own switch, `set_requires_all_reduce(False)`, is meant for gradient accumulation: it holds the gradient back
  until the next all-reduce instead of keeping it.)
- a clone or a broadcast goes rank `j` to rank `j`: one member's state in all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

MESH_DIMS = ("member", "shard")


@dataclass
class MemberLayout:
    """Where this rank sits in the clan. `member_group` joins the ranks of this member, `peer_group` the ranks that
    hold the same shard in every member; both are None when a member is one rank (peers: the default group)."""

    clan_size: int
    ranks_per_member: int
    member: int
    shard: int
    mesh: DeviceMesh | None = None
    member_group: dist.ProcessGroup | None = None
    peer_group: dist.ProcessGroup | None = None

    @property
    def sharded(self) -> bool:
        return self.ranks_per_member > 1

    def rank_of(self, member: int) -> int:
        """The global rank that holds this rank's shard in `member`."""
        return member * self.ranks_per_member + self.shard

    def first_rank(self, member: int) -> int:
        """The global rank of `member`'s first shard: the same on every rank, so a valid `src` for the whole clan."""
        return member * self.ranks_per_member

    def per_member(self, values: list) -> list:
        """One value per member from one per rank, in rank order (the ranks of a member agree)."""
        return values[:: self.ranks_per_member]


def member_layout(ranks_per_member: int, device: torch.device) -> MemberLayout:
    """This rank's layout; builds the device mesh (a collective: every rank calls it) when members are sharded."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % ranks_per_member:
        raise ValueError(
            f"`ranks_per_member={ranks_per_member}` does not divide the {world} processes of this run into members; "
            f"launch a multiple of {ranks_per_member} processes or change ranks_per_member."
        )
    clan_size = world // ranks_per_member
    if clan_size < 2:
        raise ValueError(
            f"`ranks_per_member={ranks_per_member}` with {world} processes makes {clan_size} member, and a clan needs "
            f"at least 2: launch {2 * ranks_per_member} or more processes, or lower ranks_per_member."
        )
    layout = MemberLayout(clan_size, ranks_per_member, rank // ranks_per_member, rank % ranks_per_member)
    if layout.sharded:
        layout.mesh = init_device_mesh(device.type, (clan_size, ranks_per_member), mesh_dim_names=MESH_DIMS)
        layout.member_group = layout.mesh.get_group("shard")
        layout.peer_group = layout.mesh.get_group("member")
    return layout


@dataclass
class Sharing:
    """How members share gradients in the current step: set by the trainer, read by the all-reduce hooks."""

    active: bool = True  # cooperating: gradients are shared
    sharers: int = 1  # how many members average theirs
    alone: bool = False  # this member trains alone (see `solo_radius`): it adds zeros and keeps its own gradient
    # A soloist's view of whether the sharers' mean came out finite in this step: one flag per bucket or shard, read
    # once the backward is done, so the hook never waits on the device.
    finite_flags: list[torch.Tensor] = field(default_factory=list)

    def share(self, tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.futures.Future:
        """All-reduce `tensor` (a gradient bucket, or a member's gradient shard) in place across members. The
        future's result is the sharers' mean, or for a soloist its own gradient again."""
        own = tensor.clone() if self.alone else None
        if own is not None:
            tensor.zero_()
        else:
            tensor.div_(self.sharers)

        def result(future: torch.futures.Future) -> torch.Tensor:
            if own is None:
                return future.value()[0]
            self.finite_flags.append(torch.isfinite(future.value()[0]).all())
            return own

        return dist.all_reduce(tensor, group=group, async_op=True).get_future().then(result)


def shard_member(model: nn.Module, layout: MemberLayout, sharing: Sharing) -> None:
    """Shard `model` in place over its member's ranks with FSDP2; while `sharing` is active, each gradient shard is
    shared across members (see `Sharing.share`) as soon as it is reduce-scattered.

    Every rank first takes rank 0's weights, so that the members start equal, as DDP makes them, and the shards of
    one member come from one model. Each block the model names in `_no_split_modules` (its transformer layers) is
    its own FSDP unit, so only one block is gathered at a time; the root holds the rest (embeddings, head).
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    with torch.no_grad():
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
    mesh = layout.mesh["shard"]
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if module is not model and type(module).__name__ in block_names:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)

    def average_across_members(reduce_output: torch.Tensor) -> None:
        # Linear, so sharing every micro-batch's shard shares their sum: no deferral needed under accumulation.
        if sharing.active:
            shared = sharing.share(reduce_output, layout.peer_group).wait()
            if shared is not reduce_output:
                reduce_output.copy_(shared)

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_all_reduce_hook(average_across_members)


def reshard(model: nn.Module) -> None:
    """Put a sharded member's sharded parameters back in place after a forward without backward (an evaluation):
    FSDP2 keeps the root module's weights gathered after its forward, and the clan exchanges, saves and trains the
    sharded ones."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of `tensor`: the local shard of a DTensor, the tensor itself otherwise."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def like(value: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`value` (a local shard) as a DTensor placed like `reference` when that is one, else `value` itself."""
    if isinstance(reference, DTensor):
        return DTensor.from_local(
            value, reference.device_mesh, reference.placements, shape=reference.shape, stride=reference.stride()
        )
    return value


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Optimizer state that arrived as local shards (a clone received, a checkpoint loaded) back to DTensors placed
    like their sharded parameters: the entries shaped like the parameter's shard, e.g. Adam's moments. Counters such
    as `step` stay plain, as the optimizer made them. Nothing changes for parameters that are not sharded."""
    for param, entries in optimizer.state.items():
        for key, value in entries.items():
            if key != "step" and torch.is_tensor(value) and value.shape == local(param).shape:
                entries[key] = like(value, param)


def member_grad_norm(grads: list[torch.Tensor], layout: MemberLayout) -> torch.Tensor:
    """The 2-norm of this member's whole gradient, on every rank of the member (summed over its shards)."""
    if not layout.sharded:
        return torch.nn.utils.get_total_norm(grads)
    squares = torch.stack([local(g).detach().double().pow(2).sum() for g in grads]).sum()
    dist.all_reduce(squares, group=layout.member_group)
    return squares.sqrt().float()
