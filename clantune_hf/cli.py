"""The `clantune` console script: `clantune plot OUTPUT_DIR` draws OUTPUT_DIR/clan_history.jsonl into
OUTPUT_DIR/clan_history.png."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="clantune", description="Tools for the output of a clan run.")
    commands = parser.add_subparsers(dest="command", required=True)
    plot = commands.add_parser("plot", help="Draw a run's clan_history.jsonl into a PNG.")
    plot.add_argument("output_dir", help="The run's output_dir, holding clan_history.jsonl.")
    plot.add_argument("-o", "--output", help="Where to write the PNG (default: OUTPUT_DIR/clan_history.png).")
    plot.add_argument(
        "--greater_is_better",
        action="store_true",
        help="Higher fitness is better; only read for a run that did not finish (no clan_schedule.json).",
    )
    args = parser.parse_args(argv)
    if args.command == "plot":
        from .plot import plot_history

        try:
            print(plot_history(args.output_dir, args.output, args.greater_is_better))
        except (FileNotFoundError, ValueError) as error:
            parser.exit(1, f"clantune plot: {error}\n")


if __name__ == "__main__":
    main()
