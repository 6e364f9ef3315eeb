from __future__ import annotations

import contextlib
import itertools
import math
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from accelerate.utils import DistributedType, DynamoBackend
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, PredictionOutput
from transformers.utils import logging

from .accumulation import GENE as ACCUMULATION
from .accumulation import run_slot, to_slots
from .checkpoint import (
    is_complete,
    last_checkpoint,
    load_average,
    load_clan,
    load_member,
    save_clan,
    save_member,
)
from .clan_config import ClanConfig, default_hold_confidence
from .console import use_clan_console
from .dropout import mean_dropout
from .evaluation import evaluate_clan
from .exchange import (
    agree_on_count,
    average_finite_gradients,
    broadcast_batches,
    comm_device,
    gather_weights,
    leave_together_at_exit,
)
from .expression import check_expressible, custom_expressions, decay_groups, express, with_cooldown
from .fitness import WeightAverage, check_fitness_metric, fitness_dataloader, is_paired, member_fitness
from .genes import OPTIMIZER, build_gene, describe_expressions, is_custom
from .genetics import Genome, Search, consensus, initial_clan, soloists
from .history import latest_best, write_history
from .members import Sharing, local, member_grad_norm, member_layout, shard_member
from .model_card import write_model_card
from .rounds import RoundCallback, end_round, final_round, gather_fitness

logger = logging.get_logger(__name__)


class ClanTrainer(Trainer):
    """
    A [`~transformers.Trainer`] whose processes are the members of a clan (see [`ClanConfig`]).

    Each process trains its own member (with `ranks_per_member=k`, each k processes an FSDP2-sharded one, see
    members.py): its own weights, optimizer state and genome of hyperparameters. In the cooperative steps of a round,
    gradients are all-reduced exactly as DDP does and each member applies the shared gradient with its own optimizer
    genes; in the competitive steps every member trains on rank 0's batch without gradient sync, with all its genes
    expressed (its learning rate scaled for the smaller batch, see `window_lr_scaling`). At the end of a round every
    member is evaluated on the whole `eval_dataset` (its fitness), and the weakest are overwritten in memory by
    mutated clones of the strongest.

    After [`~ClanTrainer.train`], every rank holds the best member's weights, so `save_model`, `evaluate` and
    `push_to_hub` act on it. `output_dir/clan_history.jsonl` records every member in every round and
    `output_dir/clan_schedule.json` the gene values along the best member's lineage.

    Args are those of [`~transformers.Trainer`]; `args` may be a plain `TrainingArguments` (promoted to a
    [`ClanConfig`] with the clan defaults) and `eval_dataset` is required: it is what members compete on.
    """

    _tag_names = ["clantune_hf", "clan-training"]

    def __init__(
        self,
        model: nn.Module | None = None,
        args: TrainingArguments | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        model_init=None,
        compute_loss_func=None,
        compute_metrics=None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers=(None, None),
        optimizer_cls_and_kwargs=None,
        preprocess_logits_for_metrics=None,
    ):
        if args is None:
            args = ClanConfig()
        elif not isinstance(args, ClanConfig):
            dict_args = args.to_dict()
            dict_args["hub_token"] = args.hub_token  # to_dict hides the token
            args = ClanConfig(**dict_args)
        self._hub_error: str | None = None  # why rank 0 could not create the Hub repository in Trainer.__init__
        self._initializing = True
        if eval_dataset is None:
            raise ValueError("`eval_dataset` is required: each member's fitness is its loss (or metric) on it.")
        if isinstance(eval_dataset, dict):
            raise ValueError("`eval_dataset` must be one dataset, not a dict: the clan ranks members on one set.")
        if hasattr(eval_dataset, "__len__") and len(eval_dataset) == 0:
            raise ValueError("`eval_dataset` is empty: pass at least one sample to rank the members on.")
        if model_init is not None and args.ranks_per_member > 1:
            raise ValueError(
                "`model_init` is not supported with `ranks_per_member > 1`: the clan shards the model once, at "
                "init. Pass `model` instead."
            )
        metric = args.metric_for_best_model
        if metric is not None and metric.removeprefix("eval_") != "loss" and compute_metrics is None:
            raise ValueError(
                f"`metric_for_best_model={metric!r}` needs `compute_metrics` to produce it; pass compute_metrics or "
                "drop metric_for_best_model to rank members by eval loss."
            )

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            model_init=model_init,
            compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        if self.accelerator.num_processes < 2:
            raise ValueError(
                "A clan needs one process per member and this run has 1. Launch N members with "
                "`accelerate launch --num_processes N script.py` (add `--multi_gpu` on a CPU-only machine) or "
                "`torchrun --nproc_per_node N script.py`."
            )
        if self.accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
            raise ValueError(
                f"The accelerate config selects {self.accelerator.distributed_type}, which shards state across ranks "
                "as if they were replicas of one model; a clan shards each member itself. Use a multi-GPU (DDP) "
                "config, e.g. accelerate_configs/multi_gpu.yaml, and set `ranks_per_member` in ClanConfig to shard "
                "each member over that many ranks with FSDP2."
            )
        if self.accelerator.state.dynamo_plugin.backend != DynamoBackend.NO:
            raise ValueError(
                f"The accelerate config sets `dynamo_backend` ({self.accelerator.state.dynamo_plugin.backend}): "
                "torch_compile is not supported by a clan yet (see `torch_compile`). Set dynamo_backend to 'no'."
            )
        if args.push_to_hub:
            # Only rank 0 creates the Hub repository; if it cannot, every rank stops here together.
            error = [self._hub_error]
            dist.broadcast_object_list(error, src=0)
            if error[0] is not None:
                raise RuntimeError(
                    f"`push_to_hub=True` but the Hub repository could not be created ({error[0]}). Check the network "
                    "and `hub_token`, or set push_to_hub=False and push the saved model later with `push_to_hub()`."
                )
        self._initializing = False

        # Every rank checks the layout before any compute; a sharded member is FSDP2-sharded here, once.
        self.layout = member_layout(args.ranks_per_member, self.args.device)
        if args.hold_confidence is None:
            args.hold_confidence = default_hold_confidence(self.clan_size)
        # How this step shares gradients across members; the all-reduce hooks read it.
        self._sharing = Sharing(sharers=self.clan_size)
        if self.layout.sharded:
            shard_member(self.model, self.layout, self._sharing)
            # The Trainer's path for a model that owns its sharding and gradient reduction: no DDP wrap.
            self.is_distributed_loading_by_transformers = True
        self.fitness_metric = None if metric is None or metric.removeprefix("eval_") == "loss" else metric
        self.greater_is_better = bool(args.greater_is_better) if self.fitness_metric else False
        # Captured now: the dropout gene reads the model, whose dropout the clan changes during training.
        self.base_genome: Genome = self._base_genome()
        self._custom = custom_expressions(args.genes)
        for name, expression in self._custom.items():
            expression.check(self, name)
        self.search = Search(
            initial_spread=args.initial_spread,
            initial_spread_width=args.initial_spread_width,
            resample_probability=args.resample_probability,
            step_size_control=args.step_size_control,
            mirrored=args.mirrored_clones,
        )
        self.genomes: list[Genome] = initial_clan(
            self.base_genome, self.clan_size, args.seed, self.search.initial_spread, self.search.initial_spread_width
        )
        self.clan_history: list[dict] = []
        self.clan_schedule: dict | None = None

        self._user_label_smoother = self.label_smoother
        # This step's batches, item count and (when cooperating) starting RNG state.
        self._step_inputs: tuple[list, Any, dict | None] | None = None
        self._grad_norm: torch.Tensor | None = None  # this step's gradient norm, for the clip and the logs
        self._expressed: dict[str, float] = {}
        self._expressed_phase: bool | None = None  # competitive?, or None when genes must be expressed again
        self._competitive = False
        self._diverged = False
        self._schedule_base_lrs: list[float] | None = None
        self._decay_groups: list[bool] | None = None
        self._fitness_loader: DataLoader | None = None
        self._fitness_batches: list[float] | None = None  # this member's last fitness per eval batch
        self._average = WeightAverage(horizon=args.fitness_ema_steps)
        # The last this many steps of every round are averaged for fitness (0: fitness sees the last weights).
        self._average_steps = round(args.fitness_average_window * args.round_steps)
        self._saved_member = 0  # whose weights `_save` writes: the best member's while a checkpoint is saved
        # First in line, so the final round is logged before other callbacks' on_train_end close their writers.
        self.callback_handler.callbacks.insert(0, RoundCallback(self))
        use_clan_console(self)
        leave_together_at_exit(self.layout.member_group, self.layout.peer_group)

    @property
    def member(self) -> int:
        """This rank's member (its process index when a member is one process)."""
        return self.layout.member

    @property
    def clan_size(self) -> int:
        """The number of members (the number of processes when a member is one process)."""
        return self.layout.clan_size

    # ---- Genome ----

    def _base_genome(self) -> Genome:
        """Each gene at the value the user configured (the model's dropout for `dropout`)."""
        genome = {}
        for name, options in self.args.genes.items():
            if is_custom(options):
                value = float(options["value"])
            else:
                value = mean_dropout(self.model) if name == "dropout" else float(getattr(self.args, name))
            genome[name] = build_gene(name, value, options)
        return genome

    def _is_competitive(self, step: int) -> bool:
        return step % self.args.round_steps >= self.args.cooperative_steps

    def _express(self, competitive: bool, window: bool = True) -> None:
        """Make this member's model, optimizer and loss follow its genome; specialized genes take the consensus
        while the clan cooperates, and with `window` a competitive step's learning rate is scaled for its batch."""
        if self._expressed_phase is competitive:
            return
        values = {
            name: gene.value if competitive or gene.kind == OPTIMIZER else consensus(self.genomes, name)
            for name, gene in self.genomes[self.member].items()
        }
        if self._decay_groups is None:  # the optimizer exists from the first step on
            check_expressible(self, values)
            self._decay_groups = decay_groups(self)
        # Every rank holds the same history, so every rank derives the same soloists without a collective.
        center = latest_best(self.clan_history, self.greater_is_better) if self.args.solo_center == "best" else None
        solo = soloists(self.genomes, self.args.solo_radius, center)
        cooperating_sharers = self.clan_size - len(solo)
        self._sharing.alone = self.member in solo and not competitive
        self._sharing.sharers = self.clan_size if competitive else cooperating_sharers
        expressed = dict(values)
        if competitive and window and self._scales_window_lr and self.member not in solo:
            # The square-root rule: one batch in the window where the cooperative steps averaged one per sharer.
            expressed["learning_rate"] *= math.sqrt(1 / cooperating_sharers)
        express(self, expressed, self._schedule_base_lrs, self._decay_groups, self._custom)
        self._expressed = values
        self._expressed_phase = competitive

    @property
    def _scales_window_lr(self) -> bool:
        """Whether the competitive window scales learning rates (`window_lr_scaling`): the rate is a gene, and a round
        has both cooperative steps to match and competitive steps to scale. A soloist's rate never is."""
        return (
            self.args.window_lr_scaling
            and 0 < self.args.cooperative_steps < self.args.round_steps
            and "learning_rate" in self.base_genome
        )

    # ---- Trainer hooks ----

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        with_cooldown(scheduler, self.args.cooldown_fraction, num_training_steps)
        # The user's schedule, before any gene (or a resumed checkpoint) scales it.
        self._schedule_base_lrs = list(getattr(scheduler, "base_lrs", []))
        return scheduler

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """Called once per optimizer step, before any forward: switch phase, and in competitive steps share data."""
        self._competitive = self._is_competitive(self.state.global_step)
        self._express(self._competitive)
        self._sharing.active = not self._competitive
        self._sharing.finite_flags.clear()
        count, fetch = self._accumulation(num_batches)
        batches = list(itertools.islice(epoch_iterator, fetch))
        if self._competitive:
            # Every member trains on member 0's batches (rank j of a member on those of member 0's rank j), each
            # on as many as its own accumulation count.
            batches = broadcast_batches(batches, self.layout.rank_of(0), device, self.layout.peer_group)[:count]
            num_items = self._own_num_items(batches, device)
        else:
            if not self.accelerator.even_batches:
                # Without accelerate's even batches, a rank that ran short of data would leave the others waiting
                # in DDP's all-reduce: every rank runs only as many micro-batches as the shortest.
                agreed = agree_on_count(len(batches))
                if agreed < len(batches):
                    dropped = len(batches) - agreed
                    logger.warning(
                        f"Member {self.member}: another rank ran short of data; {dropped} batch(es) dropped."
                    )
                    batches = batches[:agreed]
            num_items = self._shared_num_items(batches, device)
        # Kept so that the rare cooperative step whose shared gradient is non-finite can recompute each member's own.
        self._step_inputs = (batches, num_items, None if self._competitive else _rng_state())
        return to_slots(batches, num_batches), num_items

    def _accumulation(self, num_batches: int) -> tuple[int, int]:
        """How many micro-batches this member accumulates this step, and how many every rank draws from its data
        (the same on every rank, so their epochs end together)."""
        if ACCUMULATION not in self._expressed:
            return num_batches, num_batches
        count = int(self._expressed[ACCUMULATION])
        if not self._competitive:
            return count, count  # the clan's consensus
        return count, max(int(genome[ACCUMULATION].value) for genome in self.genomes)

    def _local_num_items(self, batches: list[dict], device: torch.device) -> Any:
        """The token count of this rank's micro-batches, not gathered across ranks (None if the model takes none)."""
        gathered = self.args.average_tokens_across_devices
        self.args.average_tokens_across_devices = False
        try:
            return self._get_num_items_in_batch(batches, device)
        finally:
            self.args.average_tokens_across_devices = gathered

    def _shared_num_items(self, batches: list[dict], device: torch.device) -> Any:
        """A cooperative step's token count: the Trainer's, gathered across ranks, unless some members train alone.
        Then a sharer counts the sharers' tokens only (times members / sharers: the sharing hook divides by the
        sharers, not by all), so it applies their per-token mean, and a soloist its own (see _own_num_items)."""
        if self._sharing.sharers == self.clan_size or not self.args.average_tokens_across_devices:
            return self._get_num_items_in_batch(batches, device)
        count = self._local_num_items(batches, device)
        shared = torch.zeros((), dtype=torch.float64, device=comm_device())
        if count is not None and not self._sharing.alone:
            shared += torch.as_tensor(count, device=comm_device())
        dist.all_reduce(shared)  # every rank, whatever its count: a soloist adds 0
        if count is None:
            return None
        if self._sharing.alone:
            return self._own_num_items(batches, device, count)
        return (shared * self.clan_size / self._sharing.sharers).to(device=device, dtype=torch.float32)

    def _own_num_items(self, batches: list[dict], device: torch.device, count: Any = None) -> Any:
        """The token count of this member's own micro-batches (over its ranks), times the number of members: what
        the Trainer's count gathered across ranks would be if every member held them, so compute_loss's
        multiplication by the world size and the member's own gradient averaging leave its per-token mean. A
        collective only inside a sharded member: members may hold different numbers of micro-batches. `count`: this
        rank's own count, when the caller has it already."""
        count = self._local_num_items(batches, device) if count is None else count
        if not self.args.average_tokens_across_devices or count is None:
            return count
        if self.layout.sharded:
            count = torch.as_tensor(count, device=comm_device())
            dist.all_reduce(count, group=self.layout.member_group)
            count = count.to(device)
        return count * self.clan_size

    def set_initial_training_values(self, args: TrainingArguments, dataloader: DataLoader) -> tuple:
        values = super().set_initial_training_values(args, dataloader)
        if ACCUMULATION not in self.args.genes:
            return values
        # A member's step takes its own number of micro-batches, so how many steps an epoch holds is not known
        # ahead: run epochs until max_steps, as the Trainer does for data without a length.
        return (sys.maxsize, *values[1:])

    def training_step(self, model: nn.Module, inputs: Any, num_items_in_batch=None) -> torch.Tensor:
        """Run one slot of micro-batches (see accumulation.py); after the step's last, check its gradient."""
        if self.layout.sharded:
            if not isinstance(model, FSDPModule):
                raise ValueError(f"ClanTrainer expects its FSDP2-sharded member, got {type(model).__name__}.")
        else:
            if not isinstance(model, DistributedDataParallel):
                raise ValueError(f"ClanTrainer expects a DistributedDataParallel model, got {type(model).__name__}.")
            # Each member's buffers (e.g. batch-norm statistics) are its own: DDP must not copy rank 0's each forward.
            if hasattr(model, "forward_sync_buffers"):
                model.forward_sync_buffers = False
            else:  # torch < 2.13
                model.broadcast_buffers = False
            if self.args.solo_radius < 1 and not getattr(model, "_clan_hook", False):
                # A soloist keeps its own gradient: DDP's all-reduce follows the clan's rule (Sharing.share).
                model.register_comm_hook(self._sharing, _share_bucket)
                model._clan_hook = True
        # Gradients are all-reduced once a step, at the last micro-batch of the last slot, and only when cooperating.
        count = len(self._step_inputs[0])
        step = super().training_step
        loss = run_slot(self, model, inputs, num_items_in_batch, step, count, sync=not self._competitive)
        if self.accelerator.sync_gradients:
            self._check_gradients(model)
        return loss

    def _values_finite(self, params: list[nn.Parameter]) -> bool:
        """Whether every gradient value of this member is finite (all its shards agreeing): the rare path taken when
        its gradient norm is not."""
        finite = all(bool(torch.isfinite(local(p.grad)).all()) for p in params)
        flag = torch.tensor([float(finite)], device=comm_device())
        if self.layout.sharded:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.layout.member_group)  # its own ranks only
        return bool(flag.item())

    def _soloist_saw_finite(self) -> bool:
        """Whether the sharers' mean came out finite, as this soloist saw it (all its shards agreeing)."""
        flags = self._sharing.finite_flags
        seen = bool(torch.stack(flags).all()) if flags else True  # one sync a step, not one a bucket
        if self.layout.sharded:
            flag = torch.tensor([float(seen)], device=comm_device())
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.layout.member_group)  # its own ranks only
            seen = bool(flag.item())
        return seen

    def _check_gradients(self, model: nn.Module) -> None:
        """After the last backward of a step: a member with a non-finite gradient skips its update and ranks last.

        The check costs nothing extra: the step's gradient norm (over all of a sharded member's shards) is computed
        once here and reused by the clip and the logs. A non-finite contribution makes the all-reduced gradient
        non-finite on every rank alike, so in that rare cooperative step every rank recomputes its own gradient and
        the healthy members share theirs without it.
        """
        params = [p for p in self.model.parameters() if p.grad is not None]
        self._grad_norm = member_grad_norm([p.grad for p in params], self.layout) if params else None
        finite = self._grad_norm is None or bool(torch.isfinite(self._grad_norm))
        # Every rank judges the shared gradient by its values, so all take the same path: a sharer holds it (a norm
        # can overflow on finite values, so an infinite norm is checked value by value), a soloist checked it.
        alone = self._sharing.alone
        if self._competitive:
            shared_finite = True
        else:
            shared_finite = self._soloist_saw_finite() if alone else finite or self._values_finite(params)
        if finite and shared_finite:
            return
        if not shared_finite:
            if not alone:
                self._recompute_own_gradients(model)
            self._grad_norm = None
            # A collective: every rank is here, the sum is theirs too.
            group, peers = self.layout.member_group, self.layout.peer_group
            if average_finite_gradients(params, group, peers, share=not alone):
                return
        for param in self.model.parameters():
            param.grad = None  # the optimizer skips parameters without a gradient: no update, no moment decay
        if not self._diverged:
            logger.warning(
                f"Member {self.member}: non-finite gradient at step {self.state.global_step}; its update is skipped "
                "and it ranks last at the next selection."
            )
        self._diverged = True

    def _recompute_own_gradients(self, model: DistributedDataParallel) -> None:
        """Run this step's micro-batches again without gradient sync, from the step's RNG state: each rank then holds
        the gradient it contributed, as it was before the all-reduce."""
        batches, num_items, rng = self._step_inputs
        self.model.zero_grad(set_to_none=True)
        self._sharing.active = False  # a sharded member's shards are not shared across members (DDP: no_sync)
        try:
            with _rng_restored(rng), self.accelerator.no_sync(model):
                for inputs in batches:
                    super().training_step(model, inputs, num_items)
        finally:
            self._sharing.active = True

    def _defer_fsdp_gradient_reduction(self):
        # The Trainer's loop wraps a step's micro-batches but the last in this (sharded members). Each micro-batch's
        # gradient shard is shared as it is made, which sums to the shared sum: nothing to defer.
        return contextlib.nullcontext()

    def _clip_grad_norm(self, model: nn.Module):
        max_norm = self._expressed.get("max_grad_norm", self.args.max_grad_norm)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if self._grad_norm is None:
            self._grad_norm = (
                member_grad_norm(grads, self.layout) if grads else torch.zeros((), device=self.args.device)
            )
        # torch's clip_grads_with_norm_, on each rank's own shards.
        coefficient = torch.clamp(max_norm / (self._grad_norm + 1e-6), max=1.0)
        if grads:
            torch._foreach_mul_([local(g) for g in grads], coefficient.to(local(grads[0]).device))
        return self._grad_norm

    def _get_grad_norm(self, model: nn.Module, grad_norm=None):
        if grad_norm is None and self._grad_norm is not None:
            return self._grad_norm
        return super()._get_grad_norm(model, grad_norm)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        if resume_from_checkpoint not in (None, False):
            resume_from_checkpoint = self._resume_point(resume_from_checkpoint)
        if resume_from_checkpoint in (None, False):
            self.clan_history = []
            if self.args.should_save:
                write_history(self.args.output_dir, [])
        if self.fitness_metric:
            check_fitness_metric(self)
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        try:
            super().init_hf_repo(token, private)
        except Exception as error:
            if not self._initializing:
                raise
            self._hub_error = f"{type(error).__name__}: {error}"  # raised on every rank in __init__

    # ---- Checkpoints ----
    # A checkpoint holds every member (each rank writes its own under clan/member-{i}), the clan's genomes and
    # history, and at its top level the best member as a plain model folder; see checkpoint.py for the layout.

    def _save_checkpoint(self, model: nn.Module, trial) -> None:
        checkpoint = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        optimizer = None if self.args.save_only_model else self.optimizer
        average = self._average.state_dict()
        save_member(checkpoint, self.layout, self.model, optimizer, self.lr_scheduler, self._diverged, average)
        if self.args.should_save:
            save_clan(checkpoint, self.genomes, self.clan_history, self.layout.ranks_per_member)
        # Rank 0 writes the top level (Trainer._save) with the best member's weights, received in memory.
        self._saved_member = latest_best(self.clan_history, self.greater_is_better)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._saved_member = 0

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if state_dict is None:
            # Every rank is here (Trainer.save_model calls _save on all): the saved member's full weights reach rank
            # 0 (None: rank 0's own model is that member).
            state_dict = gather_weights(self.model, self._saved_member, self.layout)
        if not self.args.should_save:
            return
        # The Trainer pickles `args`; a gene's callable expression is code (maybe a lambda), so it goes by its name.
        genes, self.args.genes = self.args.genes, describe_expressions(self.args.genes)
        try:
            super()._save(output_dir, state_dict)
        finally:
            self.args.genes = genes

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        # A sharded member loads its own shards in _load_optimizer_and_scheduler; the top level is for from_pretrained.
        if not self.layout.sharded:
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Nothing at the top level: each member's optimizer and scheduler are in its own folder (save_member)."""

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        # Every rank's files exist before rank 0 writes trainer_state.json, which marks the checkpoint complete.
        dist.barrier()

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Restore this rank's own member and the clan's genomes and history.

        Called after the model is wrapped in DDP, whose constructor broadcasts rank 0's weights to every rank: the
        member's weights must be loaded here, not in `_load_from_checkpoint` (which loads the best member into every
        rank, and with it the frozen weights every member shares).
        """
        if checkpoint is None:
            return
        member = load_member(checkpoint, self.layout, self.model, self.optimizer, self.lr_scheduler)
        self._diverged = member["diverged"]
        if self.args.fitness_ema_steps or self._average_steps:  # a saved average this run does not rank by stays out
            self._average.load_state_dict(load_average(checkpoint, self.layout), self.model)
        self.genomes, self.clan_history = load_clan(checkpoint, self.layout, list(self.args.genes))
        self._expressed_phase = None
        if self.args.should_save:
            # Records the killed run wrote after this checkpoint are dropped; the resumed run writes them again.
            write_history(self.args.output_dir, self.clan_history)

    def _resume_point(self, checkpoint: str | bool) -> str:
        """The checkpoint to resume (`True`: the newest complete one in output_dir), refused now if it cannot restore
        this clan."""
        if checkpoint is True:
            checkpoint = last_checkpoint(self.args.output_dir)
            if checkpoint is None:
                raise ValueError(
                    f"`resume_from_checkpoint=True` found no complete clan checkpoint in {self.args.output_dir}; "
                    "pass the path of one, or train without resume_from_checkpoint."
                )
        load_clan(checkpoint, self.layout, list(self.args.genes))
        if not is_complete(checkpoint):
            raise ValueError(
                f"{checkpoint} is incomplete (no trainer_state.json): the run was killed while writing it. Resume "
                "from an earlier checkpoint, or pass resume_from_checkpoint=True to pick the newest complete one."
            )
        return checkpoint

    # ---- Rounds (rounds.py) ----
    # The seams the fault-injection tests and the overhead benchmark override.

    def _end_round(self) -> None:
        end_round(self)

    def _final_round(self) -> None:
        final_round(self)

    def _gather_fitness(self, averaged: bool = True) -> list[float]:
        return gather_fitness(self, averaged)

    def _member_fitness(self, batches: int | None = None) -> float:
        """This member's own fitness (see fitness.py), keeping its score per eval batch when selection is paired."""
        if self._fitness_loader is None:
            self._fitness_loader = fitness_dataloader(self)
        fitness, self._fitness_batches = member_fitness(self, self._fitness_loader, batches, per_batch=is_paired(self))
        return fitness

    # ---- Evaluation ----

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """Evaluate every member on its own weights over the whole dataset (default `eval_dataset`), unsharded.

        The best member's metrics (by the clan's fitness: eval loss, or `metric_for_best_model`) are reported as
        `{metric_key_prefix}_*`, exactly as one process evaluating that member's saved model would find them, so
        `metric_for_best_model` and `EarlyStoppingCallback` see one well-defined model. Every member's metrics are
        also under `{metric_key_prefix}_clan/member_{i}/*`. After `train()` every member is the best one.
        """
        if isinstance(eval_dataset, dict):
            metrics = {}
            for name, dataset in eval_dataset.items():
                metrics.update(self.evaluate(dataset, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        metrics, _ = evaluate_clan(self, dataset, ignore_keys, metric_key_prefix)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def predict(
        self, test_dataset: Any, ignore_keys: list[str] | None = None, metric_key_prefix: str = "test"
    ) -> PredictionOutput:
        """Like [`~ClanTrainer.evaluate`], returning the best member's predictions on `test_dataset` (every rank
        gets them) with the metrics."""
        metrics, best = evaluate_clan(self, test_dataset, ignore_keys, metric_key_prefix, keep_predictions=True)
        self.control = self.callback_handler.on_predict(self.args, self.state, self.control, metrics)
        return PredictionOutput(predictions=best.predictions, label_ids=best.label_ids, metrics=metrics)

    # ---- Model card ----

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        # Checkpoints saved during training have no schedule yet and get no card; the final model does.
        if self.clan_schedule is not None or not _internal_call:
            self.create_model_card(output_dir=output_dir)

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
        output_dir: str | None = None,
    ) -> None:
        """Write `README.md` in `output_dir` (default `args.output_dir`): a model card saying the model is the best
        member of a clan, with the clan's settings and the discovered schedule as a table. No network access."""
        if self.is_world_process_zero():
            write_model_card(
                self,
                self.args.output_dir if output_dir is None else output_dir,
                language=language,
                license=license,
                tags=tags,
                model_name=model_name,
                finetuned_from=finetuned_from,
                dataset_tags=dataset_tags,
            )


def _share_bucket(sharing: Sharing, bucket):  # no annotations: DDP compares them to its own types, not strings
    """DDP's communication hook (`bucket` is a `dist.GradBucket`): the clan's rule, `Sharing.share`."""
    return sharing.share(bucket.buffer())


def _rng_state() -> dict:
    """The random state a step starts from (dropout masks), CPU and current CUDA device."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


@contextlib.contextmanager
def _rng_restored(state: dict):
    """Run the block from `state`, then continue from where the random state was before it."""
    devices = [torch.cuda.current_device()] if "cuda" in state else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state["cpu"])
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"])
        yield
