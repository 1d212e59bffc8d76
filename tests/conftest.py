"""Fixtures every test file may use (pytest finds them by name), and the machine in the report header.

    tiny_checkpoint   a checkpoint folder of random:tiny with the bundled tokenizer (once per session; copy it
                      before changing it)
    serve             start `dgemma serve` subprocesses: serve(*args, model=..., log=...) -> helpers.LiveServer;
                      every server a test started is stopped (by its pid) when the test ends

Plain helpers that are not fixtures (free_port, random_model, LiveServer) live in helpers.py.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import pytest
from helpers import LiveServer


def pytest_report_header(config) -> list[str]:
    """What timings and kernels depend on: the CPU's vector extensions and the torch build."""
    from dgemma.hw import cpu_info

    flags = (cpu_info() or ("", frozenset()))[1]
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "bf16") if f in flags]
    import torch

    return [(f"machine: {platform.machine()}, {os.cpu_count()} cores, cpu flags {' '.join(wanted) or 'unknown'}, "
             f"torch {torch.__version__} ({torch.get_num_threads()} threads)")]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from dgemma.api import BUNDLED_TOKENIZER, load
    from dgemma.checkpoint import save_checkpoint

    lm = load("random:tiny")
    return save_checkpoint(lm.model, tmp_path_factory.mktemp("ckpt") / "tiny", tokenizer_path=BUNDLED_TOKENIZER)


@pytest.fixture
def serve(tmp_path):
    started: list[LiveServer] = []

    def start(*args: str, model: str = "random:tiny", log: str | None = None, env: dict | None = None) -> LiveServer:
        server = LiveServer(tmp_path / (log or f"server-{len(started)}.log"), *args, model=model, env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
