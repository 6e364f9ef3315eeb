"""Everything the members of a clan send each other.

Rules that keep a clan from hanging: collectives here are called by every rank of their group (the default group
unless one is passed) in the same order; point-to-point transfers (`send_member`/`recv_member`) are called only by
the two ranks they connect, in the order of the selection plan that every rank holds. Tensors travel as one flat
buffer per dtype to keep the message count low. A sharded member's tensors are DTensors: each rank sends and
receives its own shard (see members.py), so ranks are always global ranks here.
"""

import atexit
import sys
import time
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from .members import MemberLayout, local, shard_optimizer_state


def comm_device() -> torch.device:
    """Where tensors must be to travel: the current CUDA device for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _object_device() -> torch.device | None:
    return comm_device() if dist.get_backend() == "nccl" else None


_exit = {"registered": False, "crashed": False, "groups": []}
# How long a process lets go of the GIL at exit, after its last collective (see `leave_together_at_exit`).
_GIL_GRACE_SECONDS = 0.5


def leave_together_at_exit(*groups: dist.ProcessGroup | None) -> None:
    """At interpreter exit, wait for every rank, leave the process group, then let go of the GIL for a moment.

    A rank that exits while another still works (e.g. rank 0 saving the model) closes links the others' gloo
    threads still watch. A rank dying of an uncaught exception skips the wait, so the launcher sees its error at once
    instead of a timeout.

    The pause is for gloo's worker threads, which can still hold the tensors of the last collectives after the script
    is done with them (a barrier keeps the collectives before it until the worker that ran it drops it). Freeing a
    tensor Python has seen takes the GIL. A worker that asks for it once the interpreter finalizes is ended mid-call,
    which aborts the process ("terminate called without an active exception"); one that asks while the main thread
    destroys its group (and so joins the workers, holding the GIL) deadlocks it. Both happen after the run has
    finished and saved, whether the script leaves the group itself (`accelerator.end_training()`) or not. So this
    holds the default group and `groups` (None for none) until exit, whoever destroys them, and lets them go only
    after the pause.
    """
    held = _exit["groups"]
    for group in (dist.group.WORLD, *groups):  # every trainer of the process passes the default group again
        if group is not None and all(group is not other for other in held):
            held.append(group)
    if _exit["registered"]:
        return
    _exit["registered"] = True
    previous_hook = sys.excepthook

    def mark_crash(*exc_info):
        _exit["crashed"] = True
        previous_hook(*exc_info)

    def leave():
        if dist.is_initialized():
            if not _exit["crashed"]:
                dist.barrier()
            dist.destroy_process_group()
        time.sleep(_GIL_GRACE_SECONDS)  # sleeping releases the GIL to any worker thread still waiting for it
        _exit["groups"].clear()  # their workers are idle now, so destroying a group no longer waits on the GIL

    sys.excepthook = mark_crash
    atexit.register(leave)


def all_gather_floats(value: float) -> list[float]:
    """Every rank's `value`, in rank order, on every rank."""
    local = torch.tensor([value], dtype=torch.float64, device=comm_device())
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return [t.item() for t in gathered]


def agree_on_count(count: int) -> int:
    """The smallest `count` over all ranks."""
    local = torch.tensor([count], dtype=torch.int64, device=comm_device())
    dist.all_reduce(local, op=dist.ReduceOp.MIN)
    return int(local.item())


def member_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """What makes a member's model its own: trainable parameters and buffers (a frozen base is shared by all)."""
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return params + list(model.named_buffers())


def _flat_groups(shapes: list[tuple[tuple[int, ...], torch.dtype]]) -> dict[torch.dtype, list[int]]:
    """Indices of `shapes` grouped by dtype, in a dtype order every rank agrees on."""
    groups: dict[torch.dtype, list[int]] = {}
    for index, (_, dtype) in enumerate(shapes):
        groups.setdefault(dtype, []).append(index)
    return {dtype: groups[dtype] for dtype in sorted(groups, key=str)}


def _pack(tensors: list[torch.Tensor], indices: list[int]) -> torch.Tensor:
    """`tensors[indices]` as one flat buffer on the transport device."""
    return torch.cat([local(tensors[i]).detach().reshape(-1).to(comm_device()) for i in indices])


def _shapes(tensors: list[torch.Tensor]) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """What travels of each tensor: this rank's shard of it."""
    return [(tuple(local(t).shape), t.dtype) for t in tensors]


def _send_flat(tensors: list[torch.Tensor], dst: int) -> int:
    sent = 0
    for indices in _flat_groups(_shapes(tensors)).values():
        flat = _pack(tensors, indices)
        dist.send(flat, dst)
        sent += flat.numel() * flat.element_size()
    return sent


def _recv_flat(shapes: list[tuple[tuple[int, ...], torch.dtype]], src: int) -> list[torch.Tensor]:
    device, out = comm_device(), [None] * len(shapes)
    for dtype, indices in _flat_groups(shapes).items():
        sizes = [torch.Size(shapes[i][0]).numel() for i in indices]
        flat = torch.empty(sum(sizes), dtype=dtype, device=device)
        dist.recv(flat, src)
        for i, chunk in zip(indices, flat.split(sizes), strict=True):
            out[i] = chunk.view(shapes[i][0])
    return out


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _optimizer_manifest(optimizer: torch.optim.Optimizer) -> list[tuple[int, str, object]]:
    """`(param index, key, description)` of every optimizer state entry; tensors are described, not included."""
    manifest = []
    for index, param in enumerate(_optimizer_params(optimizer)):
        for key, value in sorted(optimizer.state.get(param, {}).items()):
            if torch.is_tensor(value):
                shape, on_cpu = tuple(local(value).shape), value.device.type == "cpu"
                manifest.append((index, key, ("tensor", shape, value.dtype, on_cpu)))
            else:
                manifest.append((index, key, ("value", value)))
    return manifest


def send_member(
    model: nn.Module, optimizer: torch.optim.Optimizer, dst: int, extra: Sequence[torch.Tensor] = ()
) -> int:
    """Send this member's weights, buffers and optimizer state to rank `dst`, then `extra` (state of the member's
    own, e.g. its fitness weight average, shaped alike on both ranks). Returns the bytes sent."""
    manifest = _optimizer_manifest(optimizer)
    dist.send_object_list([manifest], dst=dst, device=_object_device())
    params = _optimizer_params(optimizer)
    state_tensors = [optimizer.state[params[i]][key] for i, key, desc in manifest if desc[0] == "tensor"]
    return _send_flat([t for _, t in member_tensors(model)] + state_tensors + list(extra), dst)


def recv_member(
    model: nn.Module, optimizer: torch.optim.Optimizer, src: int, extra: Sequence[torch.Tensor] = ()
) -> None:
    """Become an exact copy of rank `src`'s member: weights, buffers and optimizer state, bit for bit, and `extra`
    (overwritten in place with what the source sent as its `extra`)."""
    holder = [None]
    dist.recv_object_list(holder, src=src, device=_object_device())
    manifest = holder[0]
    own = [t for _, t in member_tensors(model)]
    state_shapes = [(desc[1], desc[2]) for _, _, desc in manifest if desc[0] == "tensor"]
    received = _recv_flat(_shapes(own) + state_shapes + _shapes(list(extra)), src)
    state_end = len(own) + len(state_shapes)
    weights, state, extras = received[: len(own)], received[len(own) : state_end], received[state_end:]
    with torch.no_grad():
        for target, value in zip([*own, *extra], weights + extras, strict=True):
            local(target).copy_(value)
    params = _optimizer_params(optimizer)
    new_state: dict[nn.Parameter, dict] = {}
    tensors = iter(state)
    for index, key, desc in manifest:
        param = params[index]
        if desc[0] == "tensor":
            value = next(tensors).to("cpu" if desc[3] else local(param).device, copy=True)
        else:
            value = desc[1]
        new_state.setdefault(param, {})[key] = value
    # Entries the source does not have (e.g. it never stepped a parameter) must not survive in the clone.
    for param in params:
        optimizer.state.pop(param, None)
    optimizer.state.update(new_state)
    shard_optimizer_state(optimizer)


def broadcast_weights(model: nn.Module, src: int, group: dist.ProcessGroup | None = None) -> None:
    """Every rank of `group` takes rank `src`'s trainable weights and buffers (not its optimizer state)."""
    tensors = [local(t) for _, t in member_tensors(model)]
    with torch.no_grad():
        for indices in _flat_groups(_shapes(tensors)).values():
            flat = _pack(tensors, indices)
            dist.broadcast(flat, src, group=group)
            for i, chunk in zip(indices, flat.split([tensors[i].numel() for i in indices]), strict=True):
                tensors[i].copy_(chunk.view_as(tensors[i]))


def gather_weights(model: nn.Module, src: int, layout: MemberLayout) -> dict[str, torch.Tensor] | None:
    """Member `src`'s full state dict, on rank 0 only (None elsewhere; also None when `src` is 0 and members are one
    rank each: use the model itself).

    Called by every rank. A sharded member `src` all-gathers its shards (a collective among its own ranks only; the
    other members take no part), then its first rank sends them to rank 0. With one rank per member only `src` and
    0 exchange tensors: parameters that are not trainable are the same in every member, so rank 0 takes its
    own. Tied weights stay tied: they are one tensor in `member_tensors`.
    """
    if layout.sharded:
        return _gather_sharded(model, src, layout)
    if src == 0 or dist.get_rank() not in (0, src):
        return None
    tensors = [t for _, t in member_tensors(model)]
    if dist.get_rank() == src:
        _send_flat(tensors, 0)
        return None
    received = _recv_flat(_shapes(tensors), src)
    by_storage = {t.data_ptr(): r.to(t.device, copy=True) for t, r in zip(tensors, received, strict=True)}
    return {name: by_storage.get(t.data_ptr(), t) for name, t in model.state_dict().items()}


def _gather_sharded(model: nn.Module, src: int, layout: MemberLayout) -> dict[str, torch.Tensor] | None:
    sender, rank = layout.first_rank(src), dist.get_rank()
    state = model.state_dict()
    full = {}
    if layout.member == src:
        for name, tensor in state.items():
            tensor = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor  # a collective in the member
            if rank == sender:
                full[name] = tensor.detach().cpu()
    if rank == sender == 0:
        return full
    if rank == sender:
        _send_flat(list(full.values()), 0)
    elif rank == 0:  # a DTensor's shape is its full shape: rank 0 knows what arrives without gathering its own
        received = _recv_flat([(tuple(t.shape), t.dtype) for t in state.values()], sender)
        return {name: value.cpu() for name, value in zip(state, received, strict=True)}
    return None


def broadcast_batches(
    batches: list[Mapping], src: int, device: torch.device, group: dist.ProcessGroup | None = None
) -> list[dict]:
    """Rank `src`'s batches on every rank of `group`, so all members train on common data. Shapes may differ across
    ranks."""
    is_src = dist.get_rank() == src
    meta = None
    if is_src:
        meta = [
            {
                key: ("tensor", tuple(value.shape), value.dtype) if torch.is_tensor(value) else ("value", value)
                for key, value in batch.items()
            }
            for batch in batches
        ]
    holder = [meta]
    dist.broadcast_object_list(holder, src=src, group=group, device=_object_device())
    transport = comm_device()
    out = []
    for index, batch_meta in enumerate(holder[0]):
        batch = {}
        for key, desc in batch_meta.items():
            if desc[0] == "value":
                batch[key] = desc[1]
                continue
            if is_src:
                tensor = batches[index][key].to(transport)
            else:
                tensor = torch.empty(desc[1], dtype=desc[2], device=transport)
            dist.broadcast(tensor, src, group=group)
            batch[key] = tensor.to(device)
        out.append(batch)
    return out


def average_finite_gradients(
    params: list[nn.Parameter],
    member_group: dist.ProcessGroup | None = None,
    peer_group: dist.ProcessGroup | None = None,
    share: bool = True,
) -> bool:
    """Average the gradients in `params` over the members whose gradients are all finite; clear them on the others.

    Called by every rank, each holding its member's own gradient (None counts as zeros), when the clan's shared
    gradient came out non-finite. A sharded member is finite when all its shards are (agreed over `member_group`);
    members average shard by shard over `peer_group`. A non-finite member contributes zeros and ends with no
    gradients, so it skips its update; the others end with the mean of the healthy members' gradients. A member
    that does not `share` (it trains alone) contributes zeros too and keeps its own gradient if finite. Returns
    whether this member was finite.
    """
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    grads = [local(p.grad) for p in params]
    healthy = torch.tensor([float(all(bool(torch.isfinite(g).all()) for g in grads))], device=comm_device())
    if member_group is not None:
        dist.all_reduce(healthy, op=dist.ReduceOp.MIN, group=member_group)
    finite = bool(healthy.item())
    contributes = finite and share
    healthy.fill_(float(contributes))
    dist.all_reduce(healthy, group=peer_group)
    count = healthy.item()  # at least 1 on a member that contributes
    with torch.no_grad():
        for indices in _flat_groups(_shapes(grads)).values():
            flat = _pack(grads, indices)
            if not contributes:
                flat.zero_()
            dist.all_reduce(flat, group=peer_group)
            if share:
                for i, chunk in zip(indices, flat.split([grads[i].numel() for i in indices]), strict=True):
                    grads[i].copy_(chunk.view_as(grads[i]).div_(count))
    if not finite:
        for param in params:
            param.grad = None
    return finite
