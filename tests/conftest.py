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


def _share_the_cores_between_workers() -> None:
    """Under pytest-xdist every worker is a process that would otherwise start one torch thread per core, so two
    workers on two cores run four busy threads and each waits on the other's (measured: a group of files took 1.7x
    longer that way). Each worker, and every process it starts (servers, torchrun, the command line), gets its share
    of the cores instead. Runs at import; tests that set their own thread count still do."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1 or "OMP_NUM_THREADS" in os.environ:
        return
    import torch

    from dgemma.hw import cores_allowed

    threads = max(1, cores_allowed() // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


_share_the_cores_between_workers()


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
