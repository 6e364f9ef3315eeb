"""The model card of a clan's best member: what a clan is, the clan's settings, its genes and the discovered schedule.

`ClanTrainer.create_model_card` writes it (with the Hub metadata) beside the saved model; no network access.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from .genetics import replaced_count
from .rounds import ranks_only

if TYPE_CHECKING:
    from .clan_trainer import ClanTrainer


def write_model_card(
    trainer: ClanTrainer,
    output_dir: str,
    language: str | None = None,
    license: str | None = None,
    tags: str | list[str] | None = None,
    model_name: str | None = None,
    finetuned_from: str | None = None,
    dataset_tags: str | list[str] | None = None,
) -> None:
    """Write `output_dir/README.md`: the Hub metadata (the base model read from the model's config when not given)
    and the card's body."""
    from huggingface_hub import ModelCard, ModelCardData

    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    is_peft = hasattr(unwrapped, "peft_config")
    if finetuned_from is None:
        name = getattr(getattr(unwrapped, "config", None), "_name_or_path", "")
        finetuned_from = name if name and not os.path.isdir(name) else None
    tags = [tags] if isinstance(tags, str) else list(tags or [])
    tags += [tag for tag in trainer._tag_names if tag not in tags]
    card_data = ModelCardData(
        language=language,
        license=license,
        library_name="peft" if is_peft else "transformers",
        base_model=finetuned_from,
        datasets=[dataset_tags] if isinstance(dataset_tags, str) else dataset_tags,
        tags=tags,
        model_name=model_name or os.path.basename(os.path.abspath(output_dir)),
    )
    body = model_card_body(trainer, card_data.model_name, finetuned_from, is_peft)
    os.makedirs(output_dir, exist_ok=True)
    ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}").save(os.path.join(output_dir, "README.md"))


def model_card_body(trainer: ClanTrainer, model_name: str, finetuned_from: str | None, is_peft: bool) -> str:
    """The card's Markdown body: the clan's settings, its genes and the discovered schedule as a table."""
    import accelerate
    import transformers

    from . import __version__

    args, schedule = trainer.args, trainer.clan_schedule
    cooperative = args.cooperative_steps
    count = replaced_count(trainer.clan_size, args.selection_fraction)
    replaced = f"{count} members were replaced by mutated clones of the {count}"
    if count == 1:
        replaced = "member was replaced by a mutated clone of one"
    gate = ""
    if args.selection_confidence:
        confidence = f"{args.selection_confidence:.0%} confidence"
        gate = f", when the stronger beat it with {confidence} (a paired t-test over the eval batches)"
    if args.hold_confidence:
        gate += (
            f"; in a round whose best fitness improved, a member the best beat with {args.hold_confidence:.0%}"
            " confidence became its exact copy (one at a time), and in one that did not, the copy explored again"
            " (`hold_confidence`)"
        )
    if ranks_only(trainer, args.round_steps):  # the first round ended inside the warmup
        warmup = args.get_warmup_steps(trainer.state.max_steps)
        gate += (
            f" (rounds that ended inside the {warmup}-step learning-rate warmup ranked without cloning,"
            " `select_in_warmup`)"
        )
    window = ""
    if trainer._scales_window_lr:
        window = (
            " In the competitive steps a member that had shared its gradient with k members trained at its learning"
            " rate times √(1/k), the square-root rule for one batch in place of k (`window_lr_scaling`)."
        )
    if trainer.fitness_metric is None:
        fitness = "eval loss (lower is better)"
    else:
        fitness = f"`{trainer.fitness_metric}` ({'higher' if trainer.greater_is_better else 'lower'} is better)"
    if trainer._average_steps:
        fitness += f" at the mean of its weights over the round's last {trainer._average_steps} steps"
    elif trainer.args.fitness_ema_steps:
        fitness += (
            f" at an exponential moving average of its weights over about {trainer.args.fitness_ema_steps} steps"
            " (`fitness_ema_steps`)"
        )
    link = f"[{finetuned_from}](https://huggingface.co/{finetuned_from})"
    if is_peft:
        origin = "This adapter was trained over a frozen base model"
        if finetuned_from is not None:
            origin = f"This adapter was trained over the frozen base model {link}"
    elif finetuned_from is None:
        origin = "This model was trained from scratch"
    else:
        origin = f"This model was fine-tuned from {link}"
    k = trainer.layout.ranks_per_member
    per_member = "one per process" if k == 1 else f"each an FSDP2-sharded model over {k} processes"
    lines = [
        f"# {model_name}",
        "",
        f"{origin} with **Clan Training** (`clantune_hf`): a clan of **{trainer.clan_size} members**,"
        f" {per_member}, trained together for {trainer.state.global_step} optimizer steps. Each round of"
        f" **{args.round_steps} steps** was cooperative (gradients shared as in DDP, each member applying them"
        f" with its own hyperparameters) for {cooperative} steps and competitive (members training alone on common"
        f" data) for {args.round_steps - cooperative} (**duty cycle {args.duty_cycle:g}**); then every member was"
        f" ranked by its {fitness} and the weakest {replaced} of the strongest{gate}.{window}"
        " These weights are the best member's at the end of training.",
        "",
        "## Genes",
        "",
        "| gene | kind | scale | bounds |",
        "|---|---|---|---|",
    ]
    for name, gene in sorted(trainer.genomes[0].items()):
        lines.append(f"| `{name}` | {gene.kind} | {gene.scale} | [{gene.low:.3g}, {gene.high:.3g}] |")
    lines += ["", "## Discovered schedule", ""]
    if schedule is None:
        lines.append("Training has not finished: the schedule is written when it does.")
    else:
        fitness_of = {(r["round"], r["member"]): r["fitness"] for r in trainer.clan_history}
        names = sorted(schedule["segments"][0]["genes"])
        lines += [
            "Gene values along the lineage of the best member, round by round (`member` is the slot that held"
            f" the lineage in that round). Fitness is {fitness}; the last row ends with the final evaluation."
            f" The run's `lr_scheduler_type` was `{schedule['base']['lr_scheduler_type']}`: the learning rate"
            " scales that shape (it is the value at the schedule's peak)."
            + (
                f" Over the run's last {schedule['base']['cooldown_fraction']:.0%}, every learning rate decayed"
                " linearly to 0 on top of that shape (`cooldown_fraction`)."
                if schedule["base"].get("cooldown_fraction")
                else ""
            ),
            "",
            "| steps | member | fitness | " + " | ".join(f"`{name}`" for name in names) + " |",
            "|---|---|---|" + "---|" * len(names),
        ]
        for segment in schedule["segments"]:
            value = fitness_of.get((segment["round"], segment["member"]))
            cells = [f"{segment['start_step']}–{segment['end_step']}", str(segment["member"])]
            cells.append("–" if value is None else f"{value:.4g}")
            cells += [f"{segment['genes'][name]:.3g}" for name in names]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [
            "",
            "The schedule is in `clan_schedule.json` beside the model; replay it in a plain `Trainer` with:",
            "",
            "```python",
            "from clantune_hf import ScheduleReplayCallback",
            "",
            'trainer.add_callback(ScheduleReplayCallback.from_file("clan_schedule.json", trainer))',
            "```",
        ]
    lines += [
        "",
        "## Framework versions",
        "",
        f"- clantune_hf: {__version__}",
        f"- Transformers: {transformers.__version__}",
        f"- PyTorch: {torch.__version__}",
        f"- Accelerate: {accelerate.__version__}",
    ]
    return "\n".join(lines) + "\n"
