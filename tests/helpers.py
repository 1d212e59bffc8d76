"""What several test files share: a free local port, a live `dgemma serve` subprocess, a random-weight model, and the
scaffold of the hypothesis fuzzes against a live server (a JSON-value strategy, their settings, request helpers, the
never-5xx / OpenAI-error-shape check, the still-alive checks after a fuzz). hypothesis and httpx are imported where
used, so that a file needing none of this does not need them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Self

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


# ---------------------------------------------------------------------------------------------------------------
# Fuzzing a live server's request bodies
ERROR_FIELDS = frozenset({"message", "type", "param"})  # OpenAI's error object


def json_values(max_leaves: int = 6, *, max_int: int = 3, floats: bool = False, max_text: int = 6,
                max_key: int = 5):
    """A hypothesis strategy for small arbitrary JSON values (null, bools, ints in [-max_int, max_int], any float when
    `floats` (NaN and infinities too), strings of up to `max_text` characters, and lists and objects of them, keys of
    up to `max_key`): what a fuzz puts in a field instead of the value of the right type."""
    from hypothesis import strategies as st

    leaves = st.none() | st.booleans() | st.integers(-max_int, max_int)
    if floats:
        leaves |= st.floats()
    leaves |= st.text(max_size=max_text)
    return st.recursive(leaves,
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=max_key), inner,
                                                                                    max_size=3),
                        max_leaves=max_leaves)


def fuzz_settings(max_examples: int):
    """The settings of a fuzz against a live server: no deadline (a request may queue behind the last one), no
    example database (nothing is replayed from an earlier run), every health check off (the server fixture is
    module-scoped and the strategies are deliberately wide)."""
    from hypothesis import HealthCheck, settings

    return settings(max_examples=max_examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))


def fuzz_path(chat: bool) -> str:
    """The endpoint a fuzz posts to: /v1/chat/completions when `chat`, else /v1/completions."""
    return "/v1/chat/completions" if chat else "/v1/completions"


def post_fuzz_body(url: str, body: dict[str, Any], chat: bool, timeout: float = 60):
    """POST `body` over a minimal valid request (prompt "x", or one user message "x" when `chat`) to the server's
    /v1/chat/completions or /v1/completions; the body's fields win."""
    import httpx

    base = {"messages": [{"role": "user", "content": "x"}]} if chat else {"prompt": "x"}
    return httpx.post(f"{url}{fuzz_path(chat)}", json={**base, **body}, timeout=timeout)


def post_fuzz_content(url: str, content: bytes, chat: bool, headers: dict[str, str] | None = None,
                      timeout: float = 60):
    """POST `content` exactly as given (no minimal request under it; not necessarily JSON: e.g. json.dumps with its
    NaN and Infinity, or random bytes) as application/json to /v1/chat/completions or /v1/completions, with
    `headers` added."""
    import httpx

    return httpx.post(f"{url}{fuzz_path(chat)}", content=content,
                      headers={"content-type": "application/json", **(headers or {})}, timeout=timeout)


def assert_no_5xx(response, body: Any) -> None:
    """The server never answers a request with a 5xx, and every 4xx is OpenAI's error shape: {"error": {message,
    type, param, ...}}. `body` is what was sent (it goes into the failure message)."""
    assert response.status_code < 500, (body, response.text)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error, dict) and set(error) >= ERROR_FIELDS, (body, response.text)


def assert_healthy(url: str) -> None:
    """The server still answers /health with a 200 (after a fuzz: nothing it was sent took it down)."""
    import httpx

    assert httpx.get(f"{url}/health").status_code == 200


def wait_metrics(url: str, done, timeout_s: float = 30) -> bool:
    """Poll /metrics until `done(text)` holds; False if it still does not after `timeout_s` (the caller decides
    whether that fails the test)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while not done(httpx.get(f"{url}/metrics").text):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True
