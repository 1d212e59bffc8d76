"""What several test files share: a free local port, a live `dgemma serve` subprocess, a random-weight model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

import torch

from dgemma.model import DiffusionGemma, init_weights

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
STARTUP_S = 120  # a server's start-up, on a shared 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_model(cfg, seed: int = 0, scale: float = 0.5, dtype: torch.dtype = torch.float32) -> DiffusionGemma:
    """A model of `cfg` with seeded random weights (`scale` above init's, so that logits are peaky), in eval mode."""
    return init_weights(DiffusionGemma(cfg), std=scale, seed=seed).eval().to(dtype)


class LiveServer:
    """`python -m dgemma.serve --model MODEL ARGS...` on 127.0.0.1 at a free port, healthy within STARTUP_S; its
    output goes to `log`. Stopped by its pid (terminate, then kill) by `stop()` or at the end of a `with` block.
    tests/ is on the server's PYTHONPATH, so `--engine-factory fake_engine:FakeEngine` works."""

    def __init__(self, log: Path, *args: str, model: str = "random:tiny", env: dict | None = None):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(log)
        environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
                   **(env or {})}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "dgemma.serve", "--model", model, "--host",
                                          "127.0.0.1", "--port", str(self.port), *args], cwd=ROOT, env=environ,
                                         stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + STARTUP_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server not healthy after {STARTUP_S} s:\n{self.log.read_text()}")
            time.sleep(0.2)

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
