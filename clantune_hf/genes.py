"""The genes a clan can schedule: what each one is, where its starting value comes from, and its default bounds.

Pure Python: no torch, no process group. `parse_gene_options` normalizes the user's `genes` field and `build_gene`
turns one entry plus its starting value into a `Gene`; `genetics.py` mutates them and `expression.py` expresses them.

Besides the built-in genes (`GENE_SPECS`), a user declares genes of their own in the `genes` dict: any name that is
not built in, with a starting `value`, bounds `low` and `high`, and an `expression` that applies a value: a callable
`expression(trainer, value)`, or an attribute path from the trainer (`"aux_weight"` sets `trainer.aux_weight`,
`"model.config.router_aux_loss_coef"` a model config field).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

OPTIMIZER = "optimizer"  # changes how a gradient becomes an update: expressed per member in both phases
SPECIALIZED = "specialized"  # changes the gradient itself: clan consensus when cooperating, own value when competing

# "log1p": logarithmic down to a thousandth of the high bound and near-linear below it, so 0 stays a reachable value
# (weight decay: 1e-4, 1e-2 and 1 are equally far apart, and 0 is the usual setting).
SCALES = ("log", "linear", "log1p")
LOG1P_FLOOR = 1e-3  # where a log1p gene turns linear, as a fraction of its high bound
KINDS = (OPTIMIZER, SPECIALIZED)
CONSENSUS_RULES = ("mean", "median")  # how the clan agrees on a specialized gene's value while it cooperates


@dataclass
class Gene:
    """One schedulable scalar. `mutation_scale` is a standard deviation in the gene's scale space (see `SCALES`)."""

    name: str
    value: float
    low: float
    high: float
    scale: str
    mutation_scale: float
    kind: str
    integer: bool = False
    consensus: str = "mean"

    def to_space(self, x: float) -> float:
        if self.scale == "log1p":
            return math.log1p(x / (LOG1P_FLOOR * self.high))
        return math.log(x) if self.scale == "log" else x

    def from_space(self, y: float) -> float:
        if self.scale == "log1p":
            return math.expm1(y) * LOG1P_FLOOR * self.high
        return math.exp(y) if self.scale == "log" else y

    @property
    def width(self) -> float:
        """Width of the bounds in scale space."""
        return self.to_space(self.high) - self.to_space(self.low)

    @property
    def unit(self) -> float:
        """An integer gene's largest step between neighbouring values, in scale space (0 for a real gene): its
        mutation scale must be able to exceed it, or the gene would stay stuck on one integer."""
        if not self.integer:
            return 0.0
        return self.to_space(self.low + 1) - self.to_space(self.low)


@dataclass(frozen=True)
class GeneSpec:
    kind: str
    scale: str
    # Valid domain of the hyperparameter itself, as (low, high, low_open, high_open).
    domain: tuple[float, float, bool, bool]
    source: str  # where the starting value comes from, for error messages (a field in backticks)
    integer: bool = False

    def contains(self, x: float) -> bool:
        low, high, low_open, high_open = self.domain
        above = x > low if low_open else x >= low
        below = x < high if high_open else x <= high
        return above and below and math.isfinite(x)

    def domain_text(self) -> str:
        low, high, low_open, high_open = self.domain
        return f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


_POSITIVE = (0.0, math.inf, True, True)
_NON_NEGATIVE = (0.0, math.inf, False, True)
_PROBABILITY = (0.0, 1.0, False, True)

GENE_SPECS: dict[str, GeneSpec] = {
    "learning_rate": GeneSpec(OPTIMIZER, "log", _POSITIVE, "`learning_rate`"),
    "weight_decay": GeneSpec(OPTIMIZER, "log1p", _NON_NEGATIVE, "`weight_decay`"),
    "adam_beta1": GeneSpec(OPTIMIZER, "linear", _PROBABILITY, "`adam_beta1`"),
    "adam_beta2": GeneSpec(OPTIMIZER, "linear", _PROBABILITY, "`adam_beta2`"),
    "adam_epsilon": GeneSpec(OPTIMIZER, "log", _POSITIVE, "`adam_epsilon`"),
    "max_grad_norm": GeneSpec(OPTIMIZER, "log", _POSITIVE, "`max_grad_norm`"),
    "dropout": GeneSpec(SPECIALIZED, "linear", _PROBABILITY, "the model's dropout probabilities"),
    "label_smoothing_factor": GeneSpec(SPECIALIZED, "linear", _PROBABILITY, "`label_smoothing_factor`"),
    # The micro-batches a member accumulates per optimizer step: one count for the whole clan while it cooperates
    # (DDP needs the same on every rank), each member its own in the competitive window.
    "gradient_accumulation_steps": GeneSpec(
        SPECIALIZED, "log", (1.0, math.inf, False, True), "`gradient_accumulation_steps`", integer=True
    ),
}
DEFAULT_GENES = ["learning_rate", "weight_decay"]
CUSTOMIZABLE = ("low", "high", "scale", "mutation_scale", "consensus")
# What a gene of the user's own declares besides those: its starting value, how it is applied, what it changes.
CUSTOM = ("value", "expression", "kind", "integer")

# Initial step size of a log-scale (or log1p) gene: exp(0.3) is a ~35% change per mutation.
LOG_MUTATION_SCALE = 0.3
# Initial step size of a linear gene, as a fraction of its bounds.
LINEAR_MUTATION_FRACTION = 0.1


def default_bounds(name: str, value: float) -> tuple[float, float]:
    """Bounds wide enough to fix a starting value that is off by 10x, narrow enough to stay trainable."""
    if name in ("learning_rate", "adam_epsilon"):
        return value / 100, value * 100
    if name == "max_grad_norm":
        return value / 10, value * 10
    if name == "weight_decay":
        return 0.0, max(0.1, 4 * value)
    if name == "adam_beta1":
        return min(value, 0.8), max(value, 0.99)
    if name == "adam_beta2":
        return min(value, 0.95), max(value, 0.9999)
    if name == "dropout":
        return 0.0, max(0.5, value)
    if name == "label_smoothing_factor":
        return 0.0, max(0.3, value)
    if name == "gradient_accumulation_steps":
        return max(1.0, float(round(value / 4))), 4.0 * value
    raise KeyError(name)


def is_custom(options: dict) -> bool:
    """Whether a parsed `genes` entry declares a gene of the user's own."""
    return "expression" in options


def describe_expressions(genes: dict[str, dict]) -> dict[str, dict]:
    """`genes` with each callable expression replaced by its qualified name, for JSON and pickles."""
    return {
        name: {
            key: f"<callable {getattr(v, '__module__', '?')}.{getattr(v, '__qualname__', repr(v))}>"
            if key == "expression" and callable(v)
            else v
            for key, v in options.items()
        }
        for name, options in genes.items()
    }


def gene_spec(name: str, options: dict) -> GeneSpec:
    """The spec of a built-in gene, or the one a custom gene's options declare."""
    if not is_custom(options):
        return GENE_SPECS[name]
    scale = options.get("scale", "linear")
    domain = {"log": _POSITIVE, "log1p": _NON_NEGATIVE}.get(scale, (-math.inf, math.inf, True, True))
    kind, integer = options.get("kind", SPECIALIZED), bool(options.get("integer", False))
    return GeneSpec(kind, scale, domain, f"`genes[{name!r}]['value']`", integer)


def parse_gene_options(genes: list[str] | dict[str, dict]) -> dict[str, dict]:
    """Normalize the `genes` field to `{name: options}` and refuse unknown names, keys and bad bounds."""
    if isinstance(genes, (list, tuple)):
        if not all(isinstance(name, str) for name in genes):
            raise ValueError(f"`genes` must list gene names as strings, got {list(genes)!r}.")
        repeated = sorted({name for name in genes if genes.count(name) > 1})
        if repeated:
            raise ValueError(f"`genes` names {repeated} more than once; name each gene once.")
        options = {name: {} for name in genes}
    elif isinstance(genes, dict):
        options = dict(genes)
    else:
        raise ValueError(f"`genes` must be a list of gene names or a dict of per-gene options, got {genes!r}.")
    if not options:
        raise ValueError("`genes` is empty: name at least one gene, e.g. genes=['learning_rate'].")
    for name, opts in options.items():
        if not isinstance(opts, dict):
            raise ValueError(f"`genes[{name!r}]` must be a dict of options {CUSTOMIZABLE}, got {opts!r}.")
        custom = set(opts) & set(CUSTOM)
        if name in GENE_SPECS and custom:
            raise ValueError(
                f"`genes[{name!r}]` declares {sorted(custom)}, but {name!r} is a built-in gene; give your own gene "
                "another name."
            )
        if name not in GENE_SPECS and not custom:
            raise ValueError(
                f"`genes` names unknown gene {name!r}; known genes are {sorted(GENE_SPECS)}. To schedule a value of "
                f"your own, declare it: genes={{{name!r}: {{'value': ..., 'low': ..., 'high': ..., 'expression': "
                "...}}."
            )
        options[name] = _parse_custom(name, opts) if custom else _parse_builtin(name, opts)
    return options


def _numbers(name: str, opts: dict, keys: tuple[str, ...]) -> dict:
    """`opts` with `keys` as floats: numbers may arrive as strings from YAML or JSON configs ("1e-5")."""
    opts = dict(opts)
    for key in keys:
        if key in opts:
            try:
                opts[key] = float(opts[key])
            except (TypeError, ValueError):
                raise ValueError(f"`genes[{name!r}]['{key}']` must be a number, got {opts[key]!r}.") from None
    return opts


def _check_common(name: str, opts: dict, spec: GeneSpec) -> None:
    """The checks every gene's options pass: scale, bounds in the domain and in order, step size, consensus."""
    if opts.get("scale", spec.scale) not in SCALES:
        raise ValueError(f"`genes[{name!r}]['scale']` must be one of {SCALES}, got {opts['scale']!r}.")
    low, high = opts.get("low"), opts.get("high")
    for key, bound in (("low", low), ("high", high)):
        if bound is not None and not spec.contains(float(bound)):
            raise ValueError(
                f"`genes[{name!r}]['{key}']` = {bound} is outside the valid domain {spec.domain_text()} of "
                f"{name}; choose a bound inside it."
            )
    if low is not None and high is not None and low >= high:
        raise ValueError(f"`genes[{name!r}]` has low={low} >= high={high}; set low below high.")
    if opts.get("scale", spec.scale) == "log" and low is not None and low <= 0:
        raise ValueError(f"`genes[{name!r}]` is log-scaled, so 'low' must be > 0 (got {low}).")
    if "mutation_scale" in opts and not 0 < opts["mutation_scale"] < math.inf:
        raise ValueError(f"`genes[{name!r}]['mutation_scale']` must be > 0 and finite, got {opts['mutation_scale']}.")
    if opts.get("consensus", "mean") not in CONSENSUS_RULES:
        raise ValueError(
            f"`genes[{name!r}]['consensus']` must be one of {CONSENSUS_RULES}, got {opts['consensus']!r}."
        )
    if spec.integer and low is not None and high is not None and math.floor(high) - math.ceil(low) < 1:
        raise ValueError(
            f"`genes[{name!r}]` is an integer gene whose bounds [{low:g}, {high:g}] hold fewer than two integers; "
            "widen them."
        )


def _parse_builtin(name: str, opts: dict) -> dict:
    unknown = set(opts) - set(CUSTOMIZABLE)
    if unknown:
        raise ValueError(f"`genes[{name!r}]` has unknown options {sorted(unknown)}; allowed are {CUSTOMIZABLE}.")
    opts = _numbers(name, opts, ("low", "high", "mutation_scale"))
    _check_common(name, opts, GENE_SPECS[name])
    return opts


def _parse_custom(name: str, opts: dict) -> dict:
    allowed = CUSTOMIZABLE + CUSTOM
    unknown = set(opts) - set(allowed)
    if unknown:
        raise ValueError(f"`genes[{name!r}]` has unknown options {sorted(unknown)}; allowed are {allowed}.")
    missing = [key for key in ("value", "low", "high", "expression") if key not in opts]
    if missing:
        raise ValueError(
            f"`genes[{name!r}]` declares a gene of your own and needs {missing}: its starting 'value', its bounds "
            "'low' and 'high', and the 'expression' that applies a value."
        )
    opts = _numbers(name, opts, ("value", "low", "high", "mutation_scale"))
    expression = opts["expression"]
    if not callable(expression) and not (isinstance(expression, str) and expression.strip()):
        raise ValueError(
            f"`genes[{name!r}]['expression']` must be a callable `expression(trainer, value)` or an attribute path "
            f"from the trainer such as 'model.config.aux_loss_coef', got {expression!r}."
        )
    if opts.get("kind", SPECIALIZED) not in KINDS:
        raise ValueError(f"`genes[{name!r}]['kind']` must be one of {KINDS}, got {opts['kind']!r}.")
    if not isinstance(opts.get("integer", False), bool):
        raise ValueError(f"`genes[{name!r}]['integer']` must be True or False, got {opts['integer']!r}.")
    _check_common(name, opts, gene_spec(name, opts))
    return opts


def build_gene(name: str, value: float, options: dict) -> Gene:
    """The gene `name` starting at `value`, with default bounds and step size unless `options` overrides them."""
    spec = gene_spec(name, options)
    if not spec.contains(value) or (spec.integer and value != round(value)):
        raise ValueError(
            f"The starting value of gene {name!r} ({spec.source} = {value}) is outside its domain "
            f"{spec.domain_text()}{' of integers' if spec.integer else ''}; set {spec.source} inside it."
        )
    low, high = (None, None) if is_custom(options) else default_bounds(name, value)
    low, high = float(options.get("low", low)), float(options.get("high", high))
    if not low <= value <= high:
        raise ValueError(
            f"The starting value of gene {name!r} ({spec.source} = {value}) lies outside its bounds [{low}, {high}]; "
            f"widen `genes[{name!r}]` or change {spec.source}."
        )
    scale = options.get("scale", spec.scale)
    if scale == "log" and low <= 0:
        raise ValueError(f"Gene {name!r} is log-scaled but its low bound is {low}; set a positive 'low'.")
    if spec.integer:
        low, high = float(math.ceil(low)), float(math.floor(high))
    consensus = options.get("consensus", "mean")
    gene = Gene(name, float(value), low, high, scale, 0.0, spec.kind, spec.integer, consensus)
    default_step = LOG_MUTATION_SCALE if scale in ("log", "log1p") else LINEAR_MUTATION_FRACTION * gene.width
    gene.mutation_scale = float(options.get("mutation_scale", max(default_step, gene.unit)))
    return gene
