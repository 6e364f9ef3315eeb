from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from transformers import TrainingArguments

from .genes import DEFAULT_GENES, build_gene, describe_expressions, is_custom, parse_gene_options
from .genetics import SOLO_CENTERS, SPREADS, STEP_SIZE_CONTROLS

# The last fifth of a run cools down by default: on the benchmark suite it helps the problems that start at a
# constant learning rate and is neutral elsewhere (docs/search.md).
DEFAULT_COOLDOWN_FRACTION = 0.2
# Members are ranked at an EMA of their weights over this many steps: one round after a clone changed its learning
# rate, the last weights favour the lower rate, and this average ranks rates as the end of the run does
# (benchmarks/results/ranking_horizon/; on the benchmark suite it closes more of the gap on five problems).
DEFAULT_FITNESS_EMA_STEPS = 25
# Holding the best is on by default in a clan of at least this many members, where its copy is at most an eighth of
# the clan: with eight members it halved the cost of a start already near right and helped nine problems of the
# benchmark suite's twelve, with four the overfitting fine-tune it costs loses more (docs/search.md).
HOLD_MIN_CLAN_SIZE = 8
DEFAULT_HOLD_CONFIDENCE = 0.99
# Schedules with a decay phase of their own, or that are not per-step factors `with_cooldown` can multiply.
SCHEDULES_WITHOUT_COOLDOWN = ("warmup_stable_decay", "reduce_lr_on_plateau", "greedy")


@dataclass
class ClanConfig(TrainingArguments):
    r"""
    Configuration for [`ClanTrainer`]: every [`~transformers.TrainingArguments`] field, plus the clan's.

    Launched with `accelerate launch --num_processes N`, the N processes are N clan members (N / k members of k
    processes each with `ranks_per_member=k`). Each round of `round_steps` optimizer steps is cooperative (shared
    gradients) for a fraction `1 - duty_cycle` of its steps and competitive (own gradients on common data) for the
    rest; then every member is evaluated and the weakest are replaced by mutated clones of the strongest.

    Parameters:
        > Parameters that control the round

        round_steps (`int`, *optional*, defaults to `200`):
            Optimizer steps per round: cooperative steps, then competitive steps, then fitness and selection.
        duty_cycle (`float`, *optional*, defaults to `0.08`):
            Fraction of a round's steps that are competitive, in [0, 1], rounded to whole steps; a value strictly
            between 0 and 1 keeps at least one step of each phase (16 competitive steps of 200 by default). `0.0`
            never competes (specialized genes are then never expressed individually); `1.0` never shares gradients
            (population based training). A competitive step trains each member on one batch where a cooperative one
            averages the batches of every member it shares with, so the window costs the clan data: a short one
            leaves more of the run to the shared gradient.
        solo_radius (`float`, *optional*, defaults to `0.25`):
            While the clan cooperates, a member whose optimizer genes (its learning rate, say) lie farther than this
            fraction of a gene's bounds, in scale space, from the last round's best member's (`solo_center`) trains
            alone: it adds nothing to the shared gradient and applies its own. The farthest train alone, as long as
            two members share. A member far from the others moves its weights at another pace, so the mean of
            gradients taken at the others' weights would steer it (and its gradient them) the wrong way. In (0, 1];
            `1.0` lets every member share.
        solo_center (`str`, *optional*, defaults to `"best"`):
            What `solo_radius` is measured from: `"best"`, the last round's best member (member 0 before the first
            round), so the best shares only with members near its genes; when no other member is near it, the
            clan's median decides instead. `"median"` always measures from the clan's median.
        window_lr_scaling (`bool`, *optional*, defaults to `True`):
            In the competitive window a member's step averages one batch where, cooperating, it averaged the batches
            of every member it shares with. With `True` its learning rate there is multiplied by
            `sqrt(1 / members it shares with)` (the square-root rule for Adam-type optimizers), so its steps are no
            noisier than the rest of the round's and members are ranked as they train. A member that trains alone
            (`solo_radius`), or a clan that never cooperates (`duty_cycle=1.0`), keeps its rate. The learning-rate
            gene, the history and the schedule keep the unscaled rate.

        > Parameters that control the genome

        genes (`list[str]` or `dict[str, dict]`, *optional*, defaults to `["learning_rate", "weight_decay"]`):
            Hyperparameters the clan schedules. Optimizer genes: `learning_rate`, `weight_decay`, `adam_beta1`,
            `adam_beta2`, `adam_epsilon`, `max_grad_norm`. Specialized genes: `dropout` (every dropout probability
            of the model), `label_smoothing_factor`, `gradient_accumulation_steps` (an integer gene). Starting values
            come from the fields of the same name (and from the model for `dropout`). A dict customizes a gene, e.g.
            `{"learning_rate": {"low": 1e-5, "high": 1e-2, "scale": "log", "mutation_scale": 0.3}}`, and a
            specialized gene's `consensus` (`"mean"` or `"median"`). A dict entry with a name of your own declares
            a gene of your own: `{"aux_weight": {"value": 0.5, "low": 0.0, "high": 2.0, "expression": "aux_weight"}}`
            with `expression` a callable `expression(trainer, value)` or an attribute path from the trainer, and
            optionally `kind` (`"specialized"`, the default, or `"optimizer"`), `scale`, `integer`,
            `mutation_scale`, `consensus`. On the command line give names (`--genes learning_rate dropout`) or the
            dict as JSON (attribute paths only).

        > Parameters that control selection

        selection_fraction (`float`, *optional*, defaults to `0.25`):
            Fraction of the clan replaced each round by clones of the same-sized top fraction (at least one member,
            at most half of the clan). The best member is never replaced.
        selection_confidence (`float`, *optional*, defaults to `0.0`):
            A member is replaced only when its clone source beats it with this confidence by a one-sided paired
            t-test over the eval batches (every member evaluates the same batches in the same order), in [0, 1).
            On a plateau, members differ by noise, and cloning on noise throws away the member that is about to
            leave it. `0` replaces the bottom fraction whatever the margin. A member with a non-finite fitness is
            always replaced.
        hold_confidence (`float`, *optional*):
            Holding the best. In a round whose best fitness beats the previous round's (so never the first), the
            lowest member the best beats with this confidence (a one-sided paired t-test over the eval batches) and
            that selection spares becomes an exact copy of the best, unless the best has one already: weights,
            optimizer state and genes, unmutated. Sharing gradients with a copy of itself, the best applies a mean
            less diluted by members at other rates and weights. In a round that does not improve, the copy goes back
            to exploring as a mutated clone of the best; rounds inside the scheduler's warmup make no copy. It lowers
            the cost of a start that is already near right, while the clan explores with one member fewer as long as
            it improves, which costs an overfitting fine-tune. Defaults to `0.99` in a clan of eight members or
            more, where the copy is an eighth of the clan, and to `0` (off) in a smaller one, where the fine-tune
            loses more than the rest gains (docs/search.md, "Holding the best"). In [0, 1); `0` switches it off.
        select_in_warmup (`bool`, *optional*, defaults to `True`):
            Whether rounds that end inside the scheduler's warmup (`warmup_steps`) select and clone. While the warmup
            ramps every member's rate up, a member's rate is a fraction of what its learning-rate gene will give it,
            so the largest genes look best: where the warmup is needed they can take the clan over and diverge
            together when it ends; where it is not, growing the gene is what undoes it. With `False` those rounds
            only rank and record (a member with a non-finite fitness is still replaced). On the held-out benchmark
            problems waiting was safer on a long warmup that was needed and worse on one that was not, so the
            default selects. A warmup shorter than a round changes nothing.
        initial_spread (`str`, *optional*, defaults to `"stratified"`):
            Where members 1..N-1 start (member 0 always starts at the configured values). `"stratified"` spreads
            them across each gene's bounds, one stratum per member (a Latin hypercube); `"local"` starts them one
            mutation step around member 0.
        initial_spread_width (`float`, *optional*, defaults to `1.0`):
            Fraction of each gene's bounds, in scale space and around member 0's value, that the stratified spread
            covers, in (0, 1]. `0.5` starts the learning rates within 10x of yours instead of 100x (mutation and
            resampling still reach the whole bounds).
        resample_probability (`float`, *optional*, defaults to `0.25`):
            Probability that a clone's gene is drawn afresh from its bounds instead of stepped from its parent's.
        step_size_control (`str`, *optional*, defaults to `"success"`):
            How mutation scales adapt. `"success"`: log-normal self-adaptation plus the 1/5th success rule (scales
            grow when a clone beats its parent, shrink when it does not). `"self_adaptive"`: log-normal only.
        mirrored_clones (`bool`, *optional*, defaults to `True`):
            Clones made in the same round pair up and step in opposite directions from their parents' values.
        fitness_average_window (`float`, *optional*, defaults to `0.0`):
            Fraction of each round, at its end, over which a member's weights are averaged for its fitness, in
            [0, 1]. Ranking the average rather than the last weights counters short-horizon bias (a member with a
            large learning rate is judged nearer where it will settle). Costs one copy of the trainable weights and
            one fused update per averaged step. On the benchmark suite it closed less of the gap than the EMA that
            ranks members by default (`fitness_ema_steps`), which a window replaces. `0` ranks the last weights (or
            the EMA). The final evaluation always ranks the weights as they are.
        fitness_ema_steps (`int`, *optional*):
            Rank members at an exponential moving average of their weights over about this many optimizer steps,
            kept every step across rounds (a clone takes its source's with its weights; checkpoints save it). It
            counters short-horizon bias: one round after a clone changed its learning rate, the last weights favour
            the lower rate, and an average over 12-25 steps ranks rates about as the end of the run does. Costs one
            copy of the trainable weights and one fused update per step. `0` ranks the last weights. Defaults to
            `25`, or to `0` with `ranks_per_member > 1` (not supported there yet) or a `fitness_average_window`.
            The final evaluation always ranks the weights as they are.
        cooldown_fraction (`float`, *optional*):
            Fraction of the run, at its end, over which every member's learning rate decays linearly to 0 on top of
            the `lr_scheduler_type` shape (a warmup-stable-decay run with the learning-rate gene as its level). The
            rounds in the cooldown rank members by their annealed weights. `0` keeps the scheduler's shape as is.
            Defaults to `0.2`, or to `0` where the schedule has a decay phase of its own (`warmup_stable_decay`) or
            is not a per-step factor a cooldown can multiply (`reduce_lr_on_plateau`, `greedy`).
        fitness_eval_samples (`int` or `None`, *optional*, defaults to `None`):
            Evaluate each member's fitness on the first this many samples of `eval_dataset` instead of all of it.

        > Parameters that control the members

        ranks_per_member (`int`, *optional*, defaults to `1`):
            Processes per member. `1`: every process is a member with its whole model (DDP across members). `k > 1`:
            the N processes form N / k members, each an FSDP2-sharded model over k consecutive ranks (HSDP across
            members), for models that one device does not hold. N must be a multiple of k, with at least 2 members.

    Fitness is each member's eval loss on its own model, or `metric_for_best_model` (with `greater_is_better`) from
    `compute_metrics` when that is set.

    Defaults that differ from [`~transformers.TrainingArguments`]:
        - `ddp_broadcast_buffers` defaults to `None`, and `ClanTrainer` turns DDP's buffer sync off on the wrapped
          model itself (`forward_sync_buffers=False`): a member's buffers are its own. `True` is refused.
        - `use_cpu` defaults to `True` when no CUDA device is available, so `accelerate launch --num_processes N`
          on a CPU-only machine starts an N-member gloo clan rather than N unrelated processes.
        - `ddp_timeout` (30 min by default) bounds the process group on CPU as well as on GPUs: a member that stops
          answering fails the clan within that time instead of hanging it.
    """

    # Parameters that control the round
    round_steps: int = field(
        default=200,
        metadata={"help": "Optimizer steps per round: cooperative steps, competitive steps, fitness, selection."},
    )
    duty_cycle: float = field(
        default=0.08,
        metadata={
            "help": "Fraction of a round's steps that are competitive, in [0, 1]; a value between 0 and 1 keeps at "
            "least one step of each phase. 0 never competes; 1 never shares gradients."
        },
    )
    solo_radius: float = field(
        default=0.25,
        metadata={
            "help": "While cooperating, members whose optimizer genes lie farther than this fraction of a gene's "
            "bounds from the last round's best member (solo_center) train alone on their own gradient, in (0, 1]; "
            "1 lets every member share."
        },
    )
    solo_center: str = field(
        default="best",
        metadata={
            "help": "What solo_radius is measured from: 'best', the last round's best member (the clan's median "
            "when no other member is near it), or 'median', the clan's median.",
            "choices": list(SOLO_CENTERS),
        },
    )
    window_lr_scaling: bool = field(
        default=True,
        metadata={
            "help": "Scale a member's learning rate in the competitive window by sqrt(1 / members it shares with "
            "while cooperating), so its window steps are no noisier than its cooperative ones."
        },
    )

    # Parameters that control the genome
    genes: list[str] | None = field(
        default=None,
        metadata={
            "help": "Hyperparameters the clan schedules: names (e.g. `--genes learning_rate dropout`) or a JSON dict "
            "of per-gene options `low`, `high`, `scale`, `mutation_scale`, `consensus`, or of genes of your own "
            "(`value`, `low`, `high`, `expression`: an attribute path). Defaults to learning_rate and weight_decay."
        },
    )

    # Parameters that control selection
    selection_fraction: float = field(
        default=0.25,
        metadata={
            "help": "Fraction of the clan replaced each round by clones of the same-sized top fraction (at least "
            "one member, at most half)."
        },
    )
    selection_confidence: float = field(
        default=0.0,
        metadata={
            "help": "Replace a member only when its clone source is better with this confidence (one-sided paired "
            "t-test over the eval batches), in [0, 1); 0 replaces the bottom fraction whatever the margin."
        },
    )
    hold_confidence: float | None = field(
        default=None,
        metadata={
            "help": "While the clan's best fitness improves, one member the best beats with this confidence (paired "
            "t-test over the eval batches) becomes its exact copy; in a round that does not improve the copy "
            "explores again. In [0, 1); 0 switches it off. Default: 0.99 in a clan of 8 members or more, else 0."
        },
    )
    select_in_warmup: bool = field(
        default=True,
        metadata={
            "help": "Select and clone in rounds that end inside the scheduler's warmup, where a member's rate is "
            "still a fraction of its gene's; False only ranks them (a non-finite member is still replaced)."
        },
    )
    initial_spread: str = field(
        default="stratified",
        metadata={
            "help": "Where members 1..N-1 start: 'stratified' across each gene's bounds, or 'local' (one mutation "
            "step around the configured values).",
            "choices": list(SPREADS),
        },
    )
    resample_probability: float = field(
        default=0.25,
        metadata={"help": "Probability that a clone's gene is drawn afresh from its bounds, in [0, 1]."},
    )
    step_size_control: str = field(
        default="success",
        metadata={
            "help": "How mutation scales adapt: 'success' (self-adaptation plus the 1/5th success rule) or "
            "'self_adaptive' (log-normal self-adaptation only).",
            "choices": list(STEP_SIZE_CONTROLS),
        },
    )
    initial_spread_width: float = field(
        default=1.0,
        metadata={"help": "Fraction of each gene's bounds (in scale space) the stratified initial spread covers."},
    )
    mirrored_clones: bool = field(
        default=True,
        metadata={"help": "Clones made in the same round pair up and step in opposite directions."},
    )
    fitness_average_window: float = field(
        default=0.0,
        metadata={
            "help": "Fraction of each round, at its end, whose weights are averaged for the member's fitness, in "
            "[0, 1]; 0 ranks the last weights."
        },
    )
    fitness_ema_steps: int | None = field(
        default=None,
        metadata={
            "help": "Rank members at an exponential moving average of their weights over about this many optimizer "
            "steps, kept across rounds; 0 ranks the last weights. Default: 25 (0 with ranks_per_member > 1 or a "
            "fitness_average_window)."
        },
    )
    cooldown_fraction: float | None = field(
        default=None,
        metadata={
            "help": "Fraction of the run, at its end, over which every learning rate decays linearly to 0 on top of "
            "the scheduler's shape, in [0, 1]; 0 keeps the shape as is. Default: 0.2 (0 for warmup_stable_decay, "
            "reduce_lr_on_plateau and greedy)."
        },
    )
    fitness_eval_samples: int | None = field(
        default=None,
        metadata={"help": "Evaluate fitness on the first this many samples of eval_dataset (default: all of it)."},
    )

    # Parameters that control the members
    ranks_per_member: int = field(
        default=1,
        metadata={
            "help": "Processes per member: 1 (each process is a member) or k > 1 (each member is an FSDP2-sharded "
            "model over k ranks; the number of processes must be a multiple of k)."
        },
    )

    # Parameters whose TrainingArguments default is changed
    ddp_broadcast_buffers: bool | None = field(
        default=None,
        metadata={"help": "Must not be True: each member keeps its own buffers (ClanTrainer turns DDP's sync off)."},
    )

    def to_dict(self) -> dict:
        # A callable expression of a gene is code, not a setting: logs and JSON get its name.
        d = super().to_dict()
        d["genes"] = describe_expressions(self.genes)
        return d

    @property
    def cooperative_steps(self) -> int:
        """The steps of each round in which the clan shares gradients; the rest are competitive. A duty cycle strictly
        between 0 and 1 keeps both phases in any round of two steps or more, however short the round."""
        steps = round(self.round_steps * (1 - self.duty_cycle))
        if 0 < self.duty_cycle < 1:
            steps = min(max(steps, 1), self.round_steps - 1)
        return steps

    def __post_init__(self):
        # Refused before TrainingArguments.__post_init__ would import DeepSpeed or set up sharding.
        if self.deepspeed:
            raise ValueError(
                "`deepspeed` shards state across ranks as if they were replicas of one model; a clan shards each "
                "member with FSDP2 itself. Remove `deepspeed`, and set `ranks_per_member` to shard a member over "
                "several ranks."
            )
        if self.fsdp:
            raise ValueError(
                "`fsdp` shards state across ranks as if they were replicas of one model; a clan shards each member "
                "with FSDP2 itself. Remove `fsdp` and set `ranks_per_member` to the number of ranks per member."
            )
        if self.fp16:
            raise ValueError(
                "`fp16` loss scaling skips steps on overflow, which a clan cannot tell from a diverging member; use "
                "`bf16` or full precision."
            )
        # Decided before the process group is set up by TrainingArguments.__post_init__.
        if not self.use_cpu and not torch.cuda.is_available():
            self.use_cpu = True
        if isinstance(self.ddp_timeout, bool) or not isinstance(self.ddp_timeout, int) or self.ddp_timeout <= 0:
            raise ValueError(
                f"`ddp_timeout` must be a positive number of seconds, got {self.ddp_timeout!r}; it bounds how long "
                "members wait for each other before the clan fails."
            )
        # transformers hands `ddp_timeout` to the process group only on GPUs. Set the CPU group up with it first, so a
        # member that is stuck or gone fails the clan within that time instead of hanging it.
        if (self.use_cpu or parse_flag_from_env("ACCELERATE_USE_CPU")) and not dist.is_initialized():
            PartialState(cpu=True, backend=self.ddp_backend, timeout=timedelta(seconds=self.ddp_timeout))
        super().__post_init__()
        if self.cooldown_fraction is None:
            own_decay = self.lr_scheduler_type.value in SCHEDULES_WITHOUT_COOLDOWN
            self.cooldown_fraction = 0.0 if own_decay else DEFAULT_COOLDOWN_FRACTION
        if self.fitness_ema_steps is None:
            sharded = type(self.ranks_per_member) is int and self.ranks_per_member > 1
            window = isinstance(self.fitness_average_window, (int, float)) and self.fitness_average_window > 0
            self.fitness_ema_steps = 0 if sharded or window else DEFAULT_FITNESS_EMA_STEPS
        if self.mixed_precision == "fp16":  # from the accelerate config (ACCELERATE_MIXED_PRECISION)
            raise ValueError(
                "`fp16` (here from the accelerate config's mixed_precision) scales the loss and skips steps on "
                "overflow, which a clan cannot tell from a diverging member; use `bf16` or full precision."
            )

        integers = ("round_steps", "fitness_eval_samples", "ranks_per_member", "fitness_ema_steps")
        fractions = (
            "initial_spread_width",
            "duty_cycle",
            "selection_fraction",
            "resample_probability",
            "fitness_average_window",
            "cooldown_fraction",
            "solo_radius",
            "selection_confidence",
            "hold_confidence",
        )
        # Unset means: every eval sample ranks members; the trainer sets holding the best from the clan's size.
        may_stay_unset = ("fitness_eval_samples", "hold_confidence")
        for name in integers + fractions:
            value = getattr(self, name)
            if value is None and name in may_stay_unset:
                continue
            integer = name in integers
            if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
                raise ValueError(f"`{name}` must be {'an integer' if integer else 'a number'}, got {value!r}.")
        if self.round_steps < 1:
            raise ValueError(f"`round_steps` must be >= 1, got {self.round_steps}.")
        if self.ranks_per_member < 1:
            raise ValueError(f"`ranks_per_member` must be >= 1 (processes per member), got {self.ranks_per_member}.")
        if self.fitness_ema_steps < 0:
            raise ValueError(
                f"`fitness_ema_steps` must be >= 0 (0 ranks the last weights), got {self.fitness_ema_steps}."
            )
        for name in ("fitness_average_window", "fitness_ema_steps"):
            if self.ranks_per_member > 1 and getattr(self, name) > 0:
                raise ValueError(
                    f"`{name}` is not supported with `ranks_per_member > 1` yet: FSDP2 gathers a member's weights "
                    f"from its own storage, which a weight average cannot be swapped into. Set {name}=0."
                )
        if self.fitness_average_window > 0 and self.fitness_ema_steps > 0:
            raise ValueError(
                "`fitness_average_window` and `fitness_ema_steps` both average the weights fitness is measured at; "
                "set one of them to 0."
            )
        if not 0.0 <= self.duty_cycle <= 1.0:
            raise ValueError(
                f"`duty_cycle` must be in [0, 1] (the competitive fraction of a round), got {self.duty_cycle}."
            )
        if not 0.0 < self.selection_fraction <= 0.5:
            raise ValueError(f"`selection_fraction` must be in (0, 0.5], got {self.selection_fraction}.")
        for name in ("resample_probability", "fitness_average_window", "cooldown_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"`{name}` must be in [0, 1], got {getattr(self, name)}.")
        if not 0.0 <= self.selection_confidence < 1.0:
            raise ValueError(
                f"`selection_confidence` must be in [0, 1) (0 clones whatever the margin), got "
                f"{self.selection_confidence}."
            )
        if self.hold_confidence is not None and not 0.0 <= self.hold_confidence < 1.0:
            raise ValueError(
                f"`hold_confidence` must be in [0, 1) (0 switches holding the best off), got {self.hold_confidence}."
            )
        for name in ("initial_spread_width", "solo_radius"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"`{name}` must be in (0, 1], got {getattr(self, name)}.")
        for name, choices in (
            ("initial_spread", SPREADS),
            ("step_size_control", STEP_SIZE_CONTROLS),
            ("solo_center", SOLO_CENTERS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"`{name}` must be one of {list(choices)}, got {getattr(self, name)!r}.")
        for name in ("mirrored_clones", "window_lr_scaling", "select_in_warmup"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}.")
        if self.fitness_eval_samples is not None and self.fitness_eval_samples < 1:
            raise ValueError(f"`fitness_eval_samples` must be >= 1 or None, got {self.fitness_eval_samples}.")
        if self.ddp_broadcast_buffers:
            raise ValueError(
                "`ddp_broadcast_buffers=True` would overwrite each member's buffers with rank 0's; leave it unset."
            )
        # False is what the clan does anyway; passed on, it would only make DDP warn that the argument is deprecated.
        self.ddp_broadcast_buffers = None
        if self.auto_find_batch_size:
            raise ValueError(
                "`auto_find_batch_size` restarts training with a smaller batch on the rank that ran out of memory, "
                "and a clan cannot restart one member while the others wait for it; set per_device_train_batch_size "
                "to a batch that fits (and gradient_accumulation_steps for a larger effective batch)."
            )
        if self.torch_compile:
            raise ValueError(
                "`torch_compile` is not supported by a clan yet: the clan changes each member's dropout and optimizer "
                "settings between phases, and a compiled model would recompile at each change. Remove torch_compile."
            )
        if self.load_best_model_at_end:
            raise ValueError(
                "`load_best_model_at_end` would load a checkpoint of one rank; a clan already ends holding its best "
                "member on every rank. Set it to False."
            )

        # From the command line a dict arrives as one JSON string, possibly inside a one-element list.
        genes = self.genes
        if isinstance(genes, list) and len(genes) == 1 and isinstance(genes[0], str) and genes[0].lstrip()[:1] == "{":
            genes = genes[0]
        if isinstance(genes, str):
            genes = json.loads(genes) if genes.lstrip().startswith("{") else genes.split()
        self.genes = parse_gene_options(DEFAULT_GENES if genes is None else genes)
        # A gene starts from the field of the same name (a gene of the user's own from its `value`): refuse a value
        # outside its domain or bounds now, not at the first step. (The dropout gene starts from the model's dropout;
        # ClanTrainer checks it.)
        for name, options in self.genes.items():
            if name != "dropout":
                build_gene(name, float(options["value"] if is_custom(options) else getattr(self, name)), options)
        if "gradient_accumulation_steps" in self.genes and self.max_steps <= 0:
            raise ValueError(
                "The `gradient_accumulation_steps` gene changes how many optimizer steps an epoch holds, so the run's "
                "length must be set in steps: set `max_steps` instead of num_train_epochs."
            )
        if "learning_rate" in self.genes and self.lr_scheduler_type in ("reduce_lr_on_plateau", "greedy"):
            raise ValueError(
                f"`lr_scheduler_type={self.lr_scheduler_type.value!r}` adapts the learning rate itself, leaving the "
                "learning_rate gene no schedule to scale; use e.g. 'linear', 'cosine' or 'constant', or drop the gene."
            )
        if self.round_steps > self.max_steps > 0:
            raise ValueError(
                f"`round_steps` ({self.round_steps}) is larger than `max_steps` ({self.max_steps}): no round would "
                "finish. Lower round_steps or raise max_steps."
            )


def default_hold_confidence(clan_size: int) -> float:
    """`hold_confidence` where the user left it unset: on in a clan of `HOLD_MIN_CLAN_SIZE` members or more."""
    return DEFAULT_HOLD_CONFIDENCE if clan_size >= HOLD_MIN_CLAN_SIZE else 0.0
