"""Recorded denoising trajectories: every step of a generation as versioned JSON lines; replay and plots.

    dgemma generate --record run.jsonl "def fibonacci(n):"       # generate and record every denoising step
    dgemma replay run.jsonl --speed 2                             # play it back in the terminal (the --live view)
    dgemma plot run.jsonl --out run.png                           # accepted positions, entropy, settle heatmap

    from dgemma.api import load, generate_text
    generate_text(load(), ["def f():"], max_new_tokens=64, seed=0, record="run.jsonl")
    traj = read("run.jsonl"); traj.tokens()                       # exactly the tokens the run produced

The playground page of `dgemma serve` (dgemma/serve/web/) loads the same files and replays them in the browser, and a
request with `"record": true` to `dgemma serve --record-dir DIR` writes DIR/ID-INDEX.jsonl (`StreamRecorder`).

Format, version 1. UTF-8, one JSON object per line, each with a "type"; ids are token ids, times are seconds since
the generation started, entropies are nats rounded to 4 decimals:

    {"type": "header", "format": "dgemma-trajectory", "version": 1, "model": name or path, "mode": "diffusion"|"ar",
     "prompt": text or null, "prompt_ids": [int], "canvas_length": C, "params": {SamplingParams fields}}
    {"type": "step", "canvas": 0-based canvas index, "step": 1-based step in the canvas, "offset": tokens
     committed before this canvas, "t": seconds, "ids": [C] the draft (argmax of every position), "accepted": [C]
     0/1 (accepted this step: entropy bound; committed so far: confidence), "entropy": [C] nats or null
     (confidence sampler), "mean_entropy": nats or null, "temperature": this step's temperature}
    {"type": "commit", "canvas": index or null (ar), "offset": tokens committed before, "t": seconds, "ids": [int]}
    {"type": "end", "finish_reason": "stop"|"length", "tokens": count, "text": the completion,
     "decoder_passes": int, "encoder_passes": int, "seconds": float, "steps_per_canvas": [int],
     "pieces": {"id": text of that one token, for every id in the file}}

A diffusion run has step lines, then the commit of that canvas (its last step's draft, cut at EOS, a stop string
or max_new_tokens); an AR run has one commit per token and no step lines. `pieces` makes the file readable without
the tokenizer (the playground decodes with it). Readers refuse other formats and newer versions; a file without
its end line was cut short. Files are written to a temporary name and renamed into place when the run ends.

Torch-free at import (the CLI builds its parsers from here); generation imports the engine when it runs.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dgemma.fsio import install_file, replacing, temp_sibling

FORMAT = "dgemma-trajectory"
VERSION = 1
_TYPES = ("header", "step", "commit", "end")
_REQUIRED = {
    "header": ("format", "version", "model", "mode", "prompt_ids", "canvas_length", "params"),
    "step": ("canvas", "step", "offset", "ids", "accepted"),
    "commit": ("offset", "ids"),
    "end": ("finish_reason", "tokens"),
}


class TrajectoryError(ValueError):
    """A file that is not a readable dgemma trajectory; the message names the file, the line and the fix."""


@dataclass
class Trajectory:
    header: dict
    steps: list[dict] = field(default_factory=list)
    commits: list[dict] = field(default_factory=list)
    end: dict | None = None

    @property
    def canvas_length(self) -> int:
        return int(self.header["canvas_length"])

    def tokens(self) -> list[int]:
        """The generated tokens, rebuilt from the steps: each canvas's last draft, cut to its commit (AR: the
        commits). Raises TrajectoryError if a commit is not what its canvas's last step drafted."""
        last = {}
        for s in self.steps:
            last[s["canvas"]] = s
        out: list[int] = []
        for c in self.commits:
            if c.get("canvas") is None:
                out.extend(c["ids"])
                continue
            step = last.get(c["canvas"])
            if step is None or step["ids"][:len(c["ids"])] != c["ids"]:
                raise TrajectoryError(f"canvas {c['canvas']}'s commit is not its last step's draft; the file was "
                                      "edited or written by something else")
            out.extend(step["ids"][:len(c["ids"])])
        return out

    def canvases(self) -> list[list[dict]]:
        """The step lines grouped by canvas, in order."""
        groups: dict[int, list[dict]] = {}
        for s in self.steps:
            groups.setdefault(s["canvas"], []).append(s)
        return [groups[k] for k in sorted(groups)]

    def piece(self, token_id: int) -> str:
        return (self.end or {}).get("pieces", {}).get(str(token_id), f"<{token_id}>")


def settle_steps(steps: list[dict]) -> list[float]:
    """Per position of one canvas: the step at which it was finally accepted, i.e. the first step of its last run
    of acceptances that lasts through the canvas's last step; NaN where the last step did not accept it."""
    C = len(steps[0]["ids"])
    out = [math.nan] * C
    for p in range(C):
        k = len(steps) - 1
        while k >= 0 and steps[k]["accepted"][p]:
            k -= 1
        if k < len(steps) - 1:
            out[p] = float(steps[k + 1]["step"])
    return out


# ---- reading ------------------------------------------------------------------------------------------------------


def read(path: str | Path) -> Trajectory:
    """Parse and check a trajectory file; TrajectoryError names the line at fault."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TrajectoryError(f"{path} is not UTF-8 text (byte {e.start}); is it a trajectory file "
                              "(`dgemma generate --record`)?") from None
    lines = text.splitlines()
    if not lines:
        raise TrajectoryError(f"{path} is empty; record one with `dgemma generate --record {path.name} PROMPT`")
    traj = None
    for n, line in enumerate(lines, 1):
        where = f"{path} line {n}"
        try:
            obj = json.loads(line)
        except ValueError as e:
            cut = " (the file looks cut short)" if n == len(lines) else ""
            raise TrajectoryError(f"{where} is not JSON{cut}: {e}") from None
        if not isinstance(obj, dict) or obj.get("type") not in _TYPES:
            raise TrajectoryError(f"{where} is not a trajectory record (a JSON object whose \"type\" is one of "
                                  f"{', '.join(_TYPES)}); is {path.name} a `dgemma generate --record` file?")
        kind = obj["type"]
        if n == 1:
            if kind != "header" or obj.get("format") != FORMAT:
                raise TrajectoryError(f"{where} is not a dgemma trajectory header (format {FORMAT!r}); is "
                                      f"{path.name} a `dgemma generate --record` file?")
            if not isinstance(obj.get("version"), int) or obj["version"] > VERSION:
                raise TrajectoryError(f"{where}: trajectory version {obj.get('version')!r} is newer than this dgemma "
                                      f"reads ({VERSION}); upgrade dgemma")
        elif kind == "header":
            raise TrajectoryError(f"{where}: a second header; files cannot be concatenated")
        elif traj.end is not None:
            raise TrajectoryError(f"{where}: a {kind} record after the end record")
        missing = [k for k in _REQUIRED[kind] if k not in obj]
        if missing:
            raise TrajectoryError(f"{where}: the {kind} record lacks {', '.join(missing)}")
        if kind == "header":
            traj = Trajectory(obj)
        elif kind == "step":
            C = traj.canvas_length
            if len(obj["ids"]) != C or len(obj["accepted"]) != C:
                raise TrajectoryError(f"{where}: a step needs {C} ids and {C} accepted flags (the header's "
                                      f"canvas_length), got {len(obj['ids'])} and {len(obj['accepted'])}")
            traj.steps.append(obj)
        elif kind == "commit":
            traj.commits.append(obj)
        else:
            traj.end = obj
    if traj.end is None:
        raise TrajectoryError(f"{path} ends at line {len(lines)} without its end record: the recording was "
                              "interrupted or the file was cut short; record it again")
    return traj


# ---- writing ------------------------------------------------------------------------------------------------------


class Recorder:
    """Writes one trajectory: `header`, then `step` / `commit` as they happen, then `end` renames it into place.
    `abandon` (or an exception inside `with`) removes the temporary file and leaves any old file alone."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp = temp_sibling(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.tmp, "w", encoding="utf-8")  # noqa: SIM115  (closed by end / abandon)
        self.ids: set[int] = set()
        self.t0 = time.perf_counter()

    def __enter__(self) -> Recorder:  # noqa: PYI034
        return self

    def __exit__(self, kind, value, tb) -> None:
        if not self.file.closed:
            self.abandon()

    def _write(self, obj: dict) -> None:
        self.file.write(json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n")

    def now(self) -> float:
        return round(time.perf_counter() - self.t0, 4)

    def header(self, model: str, mode: str, prompt: str | None, prompt_ids: list[int], canvas_length: int,
               params: dict) -> None:
        self.ids.update(prompt_ids)
        self._write({"type": "header", "format": FORMAT, "version": VERSION, "model": model, "mode": mode,
                     "prompt": prompt, "prompt_ids": list(prompt_ids), "canvas_length": canvas_length,
                     "params": params, "created": int(time.time())})

    def step(self, draft) -> None:
        """One engine Draft (dgemma.params.Draft)."""
        self.ids.update(draft.ids)
        ent = None if draft.entropy is None else [round(h, 4) for h in draft.entropy]
        self._write({"type": "step", "canvas": draft.canvas_index, "step": draft.step, "offset": draft.offset,
                     "t": self.now(), "ids": list(draft.ids), "accepted": [int(a) for a in draft.accepted],
                     "entropy": ent, "mean_entropy": None if draft.mean_entropy is None else round(draft.mean_entropy, 6),
                     "temperature": None if draft.temperature is None else round(draft.temperature, 6)})

    def commit(self, canvas: int | None, offset: int, ids: list[int]) -> None:
        self.ids.update(ids)
        self._write({"type": "commit", "canvas": canvas, "offset": offset, "t": self.now(), "ids": list(ids)})

    def end(self, tokenizer, finish_reason: str, tokens: list[int], **stats) -> None:
        pieces = {str(i): tokenizer.decode([i]) for i in sorted(self.ids)}
        self._write({"type": "end", "finish_reason": finish_reason, "tokens": len(tokens),
                     "text": tokenizer.decode(tokens), **stats, "seconds": self.now(), "pieces": pieces})
        self.file.close()
        # Not fsynced: the server ends recordings on its event loop, and a recording lost to a crash is no harm.
        install_file(self.tmp, self.path, sync=False)

    def abandon(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


# ---- the server's `record` request field ---------------------------------------------------------------------------


class StreamRecorder:
    """One server choice's recording, fed the engine's Events as the server receives them (dgemma/serve/app.py):
    `event(ev)` writes its draft, its commit and, once finished, the end record; `finish(reason)` ends it early
    (a stop string); `abandon()` (a disconnect or an error) removes the unfinished file. Records the engine's
    tokens: a stop string cuts the text the client sees, not the recorded ids."""

    def __init__(self, path: Path, tokenizer, model: str, prompt_ids: list[int], canvas_length: int, params):
        self.rec = Recorder(path)
        self.tokenizer, self.mode = tokenizer, params.mode
        self.out: list[int] = []
        self.canvas = 0
        self.passes, self.steps = 0, []
        self.done = False
        self.rec.header(model, params.mode, None, prompt_ids, canvas_length,
                        {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(params).items()})

    def event(self, ev) -> None:
        if self.done:
            return
        self.passes = ev.decoder_passes or self.passes
        if ev.draft is not None:
            self.canvas = ev.draft.canvas_index
            self.rec.step(ev.draft)
        if ev.new_ids:
            self.rec.commit(self.canvas if self.mode == "diffusion" else None, len(self.out), list(ev.new_ids))
            self.out.extend(ev.new_ids)
        if ev.finished:
            self.steps = list(ev.steps_per_canvas)
            self.finish(ev.finish_reason if ev.finish_reason in ("stop", "length") else None)

    def finish(self, reason: str | None) -> None:
        if self.done:
            return
        if reason is None:  # the engine failed the request: no trajectory to keep
            self.abandon()
            return
        self.done = True
        self.rec.end(self.tokenizer, reason, self.out, decoder_passes=self.passes, steps_per_canvas=self.steps)

    def abandon(self) -> None:
        if not self.done:
            self.done = True
            self.rec.abandon()


def record_dir_error(record_dir: str | None) -> str | None:
    """Why a request's `record: true` cannot be served, or None."""
    if record_dir is None:
        return "record needs a server started with --record-dir DIR (trajectories are written there)"
    return None


# ---- terminal replay ----------------------------------------------------------------------------------------------


def replay(traj: Trajectory, speed: float = 1.0, console=None, max_gap: float = 1.0) -> list[int]:
    """Play the run back in the terminal as `dgemma generate --live` showed it: committed text in green, the
    canvas's draft dim, accepted positions bold. `speed` 2 plays twice as fast as recorded (gaps over `max_gap`
    seconds are shortened to it); returns the tokens, rebuilt from the steps."""
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    tokens = traj.tokens()  # checks the steps against the commits before anything is shown
    console = console or Console(stderr=True)
    events = sorted([("s", s) for s in traj.steps] + [("c", c) for c in traj.commits],
                    key=lambda e: (e[1].get("t") or 0.0, e[0] == "s"))
    committed: list[int] = []
    clock = 0.0

    def view(step: dict | None) -> Text:
        text = Text("".join(traj.piece(i) for i in committed), style="green")
        if step is not None:
            for tid, acc in zip(step["ids"], step["accepted"]):
                text.append(traj.piece(tid), style="bold" if acc else "dim")
            mh = step.get("mean_entropy")
            text.append(f"\n[canvas {step['canvas']} step {step['step']}  accepted {sum(step['accepted'])}/"
                        f"{len(step['accepted'])}" + (f"  mean entropy {mh:.3f}" if mh is not None else "") + "]",
                        style="cyan")
        return text

    with Live(view(None), console=console, refresh_per_second=30, transient=True) as live:
        for kind, e in events:
            t = e.get("t") or clock
            if speed > 0:
                time.sleep(min(max(t - clock, 0.0), max_gap) / speed)
            clock = t
            if kind == "c":
                committed.extend(e["ids"])
                live.update(view(None))
            else:
                live.update(view(e))
    return tokens


# ---- plot ---------------------------------------------------------------------------------------------------------


def plot(traj: Trajectory, out: str | Path, title: str | None = None) -> Path:
    """A PNG of the run: accepted positions per step, mean entropy per step (both over the run's steps, canvases
    shaded), and a heatmap of the step at which each position of each canvas was finally accepted."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("dgemma plot needs matplotlib; pip install 'dgemma[plot]'") from None
    canvases = traj.canvases()
    if not canvases:
        raise TrajectoryError("the trajectory has no denoising steps (an AR run); record a diffusion run to plot")
    x, accepted, entropy, bounds = [], [], [], []
    for group in canvases:
        bounds.append(len(x))
        for s in group:
            x.append(len(x) + 1)
            accepted.append(sum(s["accepted"]))
            entropy.append(s.get("mean_entropy"))
    heat = [settle_steps(group) for group in canvases]
    n_steps = max(len(g) for g in canvases)

    fig = plt.figure(figsize=(10, 7.2), constrained_layout=True)
    grid = fig.add_gridspec(3, 1, height_ratios=[1, 1, max(1.0, min(2.5, 0.25 * len(heat) + 0.6))])
    ax1, ax2, ax3 = fig.add_subplot(grid[0]), fig.add_subplot(grid[1]), fig.add_subplot(grid[2])
    for ax in (ax1, ax2):
        for k, b in enumerate(bounds):
            if k % 2:
                end = bounds[k + 1] if k + 1 < len(bounds) else len(x)
                ax.axvspan(b + 0.5, end + 0.5, color="0.93", lw=0)
    ax1.bar(x, accepted, color="#3b7dd8", width=0.8)
    ax1.set_ylabel("accepted positions")
    ax1.set_ylim(0, traj.canvas_length)
    ax1.set_title(title or f"{Path(str(traj.header.get('model'))).name}: {len(canvases)} canvases, {len(x)} "
                  f"denoising steps, {traj.end.get('tokens')} tokens ({traj.end.get('tokens', 0) / len(x):.2f} per step)")
    ys = [e if e is not None else math.nan for e in entropy]
    ax2.plot(x, ys, marker="o", ms=3, color="#d8603b")
    ax2.set_ylabel("mean entropy (nats)")
    ax2.set_xlabel("denoising step (over the whole run; shading: canvases)")
    if any(e is not None and e > 0 for e in entropy):
        ax2.set_yscale("log")
    for ax in (ax1, ax2):
        ax.set_xlim(0.5, len(x) + 0.5)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.85")
    im = ax3.imshow(heat, aspect="auto", cmap=cmap, vmin=1, vmax=max(n_steps, 2), interpolation="nearest")
    ax3.set_xlabel("canvas position (grey: not accepted at the canvas's last step)")
    ax3.set_ylabel("canvas")
    ax3.set_yticks(range(len(heat)))
    fig.colorbar(im, ax=ax3, label="step finally accepted")
    out = Path(out)
    try:
        with replacing(out, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return out
