"""Draw SALGL's learned scenes from a training workdir: one PNG per scene.

    python -m mlgraph.viz heatmap --workdir DIR [--step N] [--ema | --no-ema] [--output OUT]
        [--classes NAME,NAME,... | --top N] [--classes_file NAMES.txt]
    python -m mlgraph.viz labelcloud --workdir DIR [--step N] [--ema | --no-ema] [--output OUT]
        [--classes_file NAMES.txt]

Writes `heatmap_scene{k}.png` / `labelcloud_scene{k}.png` into OUT (default DIR/viz). The step
defaults to the best by EMA mAP, the counts to the EMA model's. Class names come from the data
set in DIR/config.json, or from --classes_file (one name per line). Errors print one line and
exit with status 2.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence

from mlgraph import viz
from mlgraph.errors import MlgraphError


def parser() -> argparse.ArgumentParser:
    """The command-line parser (subcommands `heatmap` and `labelcloud`)."""
    p = argparse.ArgumentParser(
        prog="python -m mlgraph.viz", description="Draw SALGL's learned scenes, one PNG per scene."
    )
    sub = p.add_subparsers(dest="command", required=True)
    commands = {
        "heatmap": "scene-conditional label co-occurrence probabilities",
        "labelcloud": "word clouds of the labels each scene collected",
    }
    for name, help_text in commands.items():
        s = sub.add_parser(name, help=help_text, description=help_text)
        s.add_argument("--workdir", required=True, help="a SALGL training workdir")
        s.add_argument("--step", type=int, default=None, help="checkpoint step (default: best)")
        s.add_argument(
            "--ema",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="use the EMA model's counts (default) or, with --no-ema, the model's",
        )
        s.add_argument("--output", default=None, help="output folder (default: WORKDIR/viz)")
        s.add_argument(
            "--classes_file",
            default=None,
            help="class names, one per line (instead of opening the workdir's data set)",
        )
        if name == "heatmap":
            pick = s.add_mutually_exclusive_group()
            pick.add_argument(
                "--classes", default=None, help="comma-separated class names to draw, in order"
            )
            pick.add_argument(
                "--top",
                type=int,
                default=None,
                help="draw the N most frequent classes (default: all if at most 20, else 20)",
            )
    return p


def run(args: argparse.Namespace) -> list[pathlib.Path]:
    """Run a parsed command; returns the written paths (and prints a summary)."""
    purpose = "heatmaps" if args.command == "heatmap" else "label clouds"
    comatrix, step = viz.read_comatrix(args.workdir, args.step, args.ema, purpose)
    names, config = viz.read_class_names(args.workdir, args.classes_file)
    source = f"--classes_file {args.classes_file}" if args.classes_file else "the data set"
    viz.check_class_count(names, comatrix, source)
    notes = viz.demo_scene_notes(config, comatrix, names)
    out_dir = pathlib.Path(args.output) if args.output else pathlib.Path(args.workdir) / "viz"
    if args.command == "heatmap":
        classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
        paths = viz.heatmaps(
            comatrix, names, out_dir, classes=classes, top=args.top, scene_notes=notes
        )
    else:
        paths = viz.label_clouds(comatrix, names, out_dir, scene_notes=notes)
    which = "EMA model" if args.ema else "model"
    print(f"{args.workdir}: step {step}, {which} counts, {comatrix.shape[0]} learned scenes")
    shares = viz.scene_shares(comatrix)
    counts = viz.label_counts(comatrix)
    for k, path in enumerate(paths):
        top = [names[i] for i in counts[k].argsort()[::-1][:3] if counts[k, i] > 0]
        most = ", ".join(top) or "none"
        line = f"scene {k}: {shares[k]:.1%} of counted labels, most counted: {most}"
        if notes and notes[k]:
            line += f"; {notes[k]}"
        print(f"{line} -> {path}")
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 for a user error)."""
    args = parser().parse_args(argv)
    try:
        run(args)
    except (MlgraphError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
