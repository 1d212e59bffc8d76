"""`dgemma replay` and `dgemma plot`: a recorded trajectory (dgemma/engine/trajectory.py) played back in the terminal
or drawn as a PNG."""

from __future__ import annotations

import sys
from pathlib import Path

from dgemma.engine.trajectory import plot, read, replay


def add_cli(sub) -> None:
    """Register `replay` and `plot` on argparse subparsers; imports nothing heavy."""
    from dgemma.options import float_in

    p = sub.add_parser("replay", help="play a recorded trajectory back in the terminal",
                       description="Play back a file from `dgemma generate --record` as the --live view showed it "
                                   "(on stderr); the completion goes to stdout.")
    p.add_argument("file", help="a trajectory .jsonl file")
    p.add_argument("--speed", type=float_in(0, 1000), default=1.0,
                   help="playback speed, 1 = as recorded, 0 = no waiting (default 1)")
    p.set_defaults(func=_run_replay)
    p = sub.add_parser("plot", help="plot a recorded trajectory (PNG; needs matplotlib)",
                       description="Accepted positions per step, mean entropy per step, and the step at which each "
                                   "position of each canvas was finally accepted.")
    p.add_argument("file", help="a trajectory .jsonl file")
    p.add_argument("--out", default=None, help="PNG to write (default: FILE with .png)")
    p.add_argument("--title", default=None)
    p.set_defaults(func=_run_plot)


def _run_replay(args) -> int:
    traj = read(args.file)
    replay(traj, speed=args.speed)
    sys.stdout.write(traj.end.get("text", "".join(traj.piece(i) for i in traj.tokens())))
    sys.stdout.write("\n")
    return 0


def _run_plot(args) -> int:
    out = plot(read(args.file), args.out or Path(args.file).with_suffix(".png"), args.title)
    print(f"wrote {out}", file=sys.stderr)
    return 0
