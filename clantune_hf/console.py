"""What a clan prints: one compact line per round and a table of the members at the end.

Every per-member scalar (`clan/member_*`, `eval_clan/member_*`) still reaches the `report_to` integrations; only the
console leaves them out, since their number grows with the clan (about a hundred keys a round at 16 members).
"""

from __future__ import annotations

import math
import re

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

_MEMBER_KEY = re.compile(r"clan/member_(\d+)/(.+)")


def for_console(logs: dict) -> dict:
    """`logs` without the per-member scalars."""
    return {key: value for key, value in logs.items() if not _MEMBER_KEY.search(key)}


def round_line(logs: dict) -> str | None:
    """One line for a round's logs (None for other logs)."""
    if "clan/best_member" not in logs or "clan/fitness_min" not in logs:
        return None
    genes = ", ".join(
        f"{key.removeprefix('clan/best_')} {_number(value)}"
        for key, value in logs.items()
        if key.startswith("clan/best_") and key != "clan/best_member"
    )
    return (
        f"clan round {logs.get('clan/round', '?')}: best member {logs['clan/best_member']}, fitness "
        f"{_number(logs['clan/fitness_min'])} / {_number(logs['clan/fitness_median'])} / "
        f"{_number(logs['clan/fitness_max'])} (min / median / max), {logs['clan/replaced']} replaced; best genes: "
        f"{genes}"
    )


def members_table(logs: dict) -> str:
    """A table of every member's fitness and genes from a round's logs, the best marked with `*`."""
    members: dict[int, dict[str, float]] = {}
    for key, value in logs.items():
        match = _MEMBER_KEY.fullmatch(key)
        if match and not key.startswith("eval_"):
            members.setdefault(int(match.group(1)), {})[match.group(2)] = value
    genes = {name for values in members.values() for name in values} - {"fitness", "cloned_from"}
    columns = ["fitness", *sorted(genes)]
    rows = [["member", *columns]]
    for member, values in sorted(members.items()):
        mark = "*" if member == logs.get("clan/best_member") else " "
        rows.append([f"{mark}{member}", *(_number(values.get(name, math.nan)) for name in columns)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)) for row in rows)


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class _ClanConsole:
    """Shared by the two console callbacks below: compact logs, and the final table at the end of training."""

    last_round: dict | None = None

    def _console(self, logs: dict) -> tuple[str | None, dict]:
        line = round_line(logs)
        if line is not None:
            self.last_round = dict(logs)
        return line, for_console(logs)

    def _final_table(self, state) -> str | None:
        if self.last_round is None:
            return None
        return f"Clan at step {state.global_step} (* the best member, whose model training ends with):\n" + (
            members_table(self.last_round)
        )


class ClanProgressCallback(_ClanConsole, ProgressCallback):
    """The Trainer's progress bar, printing a compact line per round."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        line, logs = self._console(logs or {})
        if line is None:
            return super().on_log(args, state, control, logs=logs, **kwargs)
        if state.is_world_process_zero and self.training_bar is not None:
            self.training_bar.write(line)

    def on_train_end(self, args, state, control, **kwargs):
        table = self._final_table(state)
        if state.is_world_process_zero and table is not None and self.training_bar is not None:
            self.training_bar.write(table)
        super().on_train_end(args, state, control, **kwargs)


class ClanPrinterCallback(_ClanConsole, PrinterCallback):
    """The Trainer's printer (with `disable_tqdm`), printing a compact line per round."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        line, logs = self._console(logs or {})
        if line is None:
            return super().on_log(args, state, control, logs=logs, **kwargs)
        if state.is_world_process_zero:
            print(line)

    def on_train_end(self, args, state, control, **kwargs):
        table = self._final_table(state)
        if state.is_world_process_zero and table is not None:
            print(table)


def use_clan_console(trainer) -> None:
    """Swap the Trainer's console callback for the clan's."""
    for plain, clan in ((ProgressCallback, ClanProgressCallback), (PrinterCallback, ClanPrinterCallback)):
        callback: TrainerCallback | None = trainer.pop_callback(plain)
        if callback is not None:
            trainer.add_callback(clan)
