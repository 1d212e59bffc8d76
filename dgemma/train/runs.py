"""The run folder, shared by `dgemma train` and `dgemma finetune`: checkpoints written atomically, `latest`, the log,
the resume check and the RNG state that exact resume needs.

    RUN/train_config.json (or finetune_config.json)   the run's settings and model config; a resume must agree
    RUN/log.jsonl                                      one JSON object per step, validation, checkpoint and stop
    RUN/checkpoints/step-000500/                       the model (or adapter) folder plus trainer_state.pt
    RUN/latest -> checkpoints/step-...                 the newest complete checkpoint

A checkpoint is written under a temporary name and renamed into place, its trainer_state.pt last, so a folder
holding trainer_state.pt is complete and an interruption at any point leaves `latest` on a complete one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dgemma.fsio import install_file, install_folder, replacing, temp_sibling, write_json_atomic, write_text_atomic
from dgemma.options import TrainError

TRAINER_STATE = "trainer_state.pt"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
LOG = "log.jsonl"


def jsonable(v: Any) -> Any:
    """`v` as it reads back from JSON (tuples become lists), for comparing settings with a saved run's."""
    return json.loads(json.dumps(v, default=str))


def is_complete(folder: Path) -> bool:
    return (folder / TRAINER_STATE).is_file()


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint of a run (where `latest` points, else the highest complete step folder)."""
    run = Path(run_dir)
    link = run / LATEST
    if (link.is_symlink() or link.is_dir()) and is_complete(link.resolve()):
        return link.resolve()
    found = sorted((p for p in (run / CHECKPOINTS).glob("step-*") if is_complete(p)), reverse=True)
    return found[0] if found else None


def point_latest(run: Path, folder: Path) -> None:
    """Point the symlink `latest` at `folder`: a new link under a temporary name, renamed over the old one."""
    tmp = temp_sibling(run / LATEST)
    os.symlink(os.path.relpath(folder, run), tmp)
    install_file(tmp, run / LATEST, sync=False)


def write_checkpoint(run: Path, step: int, save_model: Callable[[Path], None], trainer_state: dict[str, Any],
                     keep: int) -> Path:
    """Write checkpoints/step-NNNNNN under a temporary name (`save_model(folder)` writes the model or adapter, then
    trainer_state.pt), rename it into place, move `latest` to it and keep the newest `keep` (0: all)."""
    root = run / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step-*"):  # leftovers of an interrupted write
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:06d}"
    staging = root / f".{final.name}.partial"
    save_model(staging)
    with replacing(staging / TRAINER_STATE) as tmp:  # last: a folder holding it is complete
        torch.save(trainer_state, tmp)
    install_folder(staging, final)  # a step re-reached after resuming replaces the earlier folder
    point_latest(run, final)
    if keep:
        for old in sorted(p for p in root.glob("step-*") if is_complete(p))[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def check_resume(run: Path, resume: bool, config_file: str, section: str, settings: dict[str, Any],
                 identity: Sequence[str]) -> tuple[Path | None, dict | None]:
    """(the checkpoint to resume, the saved run config) for a run in `run`, or (None, None) for a new run. Refuses
    a folder with checkpoints without `resume`, `resume` without one, and settings in `identity` that differ from
    the saved `section` of `config_file`."""
    resume_from = latest_checkpoint(run) if run.exists() else None
    if resume_from is None:
        if resume:
            where = f"{run} has no complete checkpoint" if run.exists() else f"{run} does not exist"
            raise TrainError(f"--resume: nothing to resume, {where}; drop --resume to start a new run there, or "
                             "give the --out of the run to continue")
        return None, None
    if not resume:
        raise TrainError(f"{run} already holds checkpoints (newest: {resume_from.name}); pass --resume to continue "
                         "that run, or choose a new --out")
    try:
        saved = json.loads((run / config_file).read_text())
        before = saved[section]
    except (OSError, ValueError, KeyError) as e:
        raise TrainError(f"cannot read {run / config_file} ({e}); the run folder is damaged") from None
    mine = jsonable(settings)
    diffs = [f"--{k.replace('_', '-')}: run has {before.get(k)!r}, now {mine[k]!r}" for k in identity
             if jsonable(before.get(k)) != mine[k]]
    if diffs:
        raise TrainError(f"cannot resume {run} with different settings ({'; '.join(diffs)}); use the same flags "
                         "or start a new --out")
    return resume_from, saved


def write_run_config(run: Path, config_file: str, section: str, settings: dict[str, Any], model: dict) -> None:
    run.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run / config_file, {section: jsonable(settings), "model": model})


class RunLog:
    """log.jsonl: one JSON object per line, appended and flushed (main process only)."""

    def __init__(self, path: Path, enabled: bool, keep_until_step: int | None):
        """keep_until_step: None starts a new log; a step keeps the records up to it (resuming)."""
        self.path, self.enabled = path, enabled
        if enabled and keep_until_step is None:
            path.unlink(missing_ok=True)  # a fresh run in a folder that held an unfinished start
        if enabled and keep_until_step is not None and path.exists():
            # Resuming: drop records of steps after the checkpoint (they will be redone).
            kept = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= keep_until_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    pass  # a line cut by a crash
            write_text_atomic(path, "".join(k + "\n" for k in kept))
        self.file = open(path, "a") if enabled else None  # noqa: SIM115 (open for the whole run)

    def write(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
