"""`dgemma bench serve`: load-test the OpenAI-compatible server, diffusion against AR, at several concurrencies.

    python -m dgemma.bench.serve --quick                              # random:tiny, concurrency 1,4; under a minute
    python -m dgemma.bench.serve --model models/dgemma-py-small       # the bundled model, concurrency 1,4,16,64
    python -m dgemma.bench.serve --url http://127.0.0.1:8000          # a server that is already running

It starts `python -m dgemma.serve` on 127.0.0.1 and a free port (or targets --url), waits for /health, sends one
unmeasured warm-up request per mode, then for each concurrency c, diffusion then AR (the two modes alternate so
that what is compared is measured close in time), runs a closed loop: c clients, each sending its next streaming
/v1/completions request as soon as its previous one has ended, until the level's requests (default max(2c, 8))
are sent or the level's time cap has passed (requests not started by then are skipped and counted as such).
Prompts are fixed, every request has its own seed (the same seeds in both modes) and asks for exactly
--max-tokens tokens with `ignore_eos`, so a request is complete when its stream ends with finish_reason "length",
usage.completion_tokens == max_tokens and `[DONE]`; anything else (an HTTP error, an error event, a timeout, a
short answer) is a lost request.

Per level: aggregate completion tokens/s (all tokens / the level's wall time), time to the first committed token
(first non-empty text chunk; for diffusion that is the first canvas), request latency p50/p99, latency per
committed canvas (diffusion: latency / ceil(tokens / canvas length)), and from /metrics before and after the
level: decoder and encoder passes and committed tokens per forward. Because the machine may be shared, each level
also records the CPU cores the server process used on average (/proc/<pid>/stat) and the 1-minute load average.
The server's peak RSS comes from /proc/<pid>/status (VmHWM, and VmRSS sampled during each level); with --url, from
/metrics' process_resident_memory_bytes if the server exports it, else null.

Prints a table, writes NAME.json and NAME.png (tokens/s and latency against concurrency; needs matplotlib, the
plot extra: skipped with a note otherwise) to --out, then prints the JSON as one line, last. The client shares
the machine with the server: on a small CPU its own work (SSE parsing, one event per AR token) is part of what is
measured, so compare the two modes as ratios inside one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from dgemma.fsio import git_dirty, git_revision, replacing, write_json_atomic
from dgemma.options import positive_float, positive_int, seed_int

MODES = ("diffusion", "ar")
DEFAULT_OUT = "benchmarks/results/serve"

# Fixed prompts (the bundled model writes Python); request i uses PROMPTS[i % len(PROMPTS)] and seed + i.
PROMPTS = (
    "def fibonacci(n):",
    "import os\n\n\ndef list_files(path):",
    "class Stack:\n    def __init__(self):",
    "def read_json(path):\n    \"\"\"Read a JSON file and return its content.\"\"\"",
    "for i in range(10):",
    "def is_prime(n: int) -> bool:",
    "import numpy as np\n\nx = np.",
    "def merge_sort(items):",
)


@dataclass
class ServeBenchConfig:
    """Every flag of `dgemma bench serve` (add_arguments mirrors these fields; defaults live here only)."""
    model: str | None = None  # checkpoint folder or random:PRESET; None: the server's default (the bundled model)
    url: str | None = None  # a running server instead of starting one
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    modes: tuple[str, ...] = MODES
    max_tokens: int = 256
    requests: int | None = None  # per level; None: max(2c, 8)
    level_time_s: float = 180.0  # no request starts after this many seconds of a level
    request_timeout_s: float = 600.0  # a request still running after this is lost
    startup_timeout_s: float = 300.0  # the server must answer /health within this
    seed: int = 0
    denoising_steps: int | None = None  # None: the model's default
    ignore_eos: bool = True
    warmup: bool = True  # one short unmeasured request per mode first
    max_batch: int | None = None  # server flags; None: EngineConfig's default
    kv_memory_mb: float | None = None
    dtype: str | None = None
    batch_invariant: bool = True  # the server's default; False passes --no-batch-invariant
    lora: tuple[str, ...] = ()  # NAME=DIR adapters for the server (--lora): each level also runs with requests
    # spread over the base and every adapter, beside the base-only level
    out: str = DEFAULT_OUT
    name: str | None = None  # output files NAME.json / NAME.png; None: "quick", or the model folder's name
    quick: bool = False

    def resolved(self) -> ServeBenchConfig:
        """--quick's settings where the user gave none (a short CI run on random weights)."""
        if not self.quick:
            return self
        c = ServeBenchConfig()
        quick = {"model": "random:tiny", "concurrency": (1, 4), "max_tokens": 32, "requests": 4, "level_time_s": 20.0,
                 "request_timeout_s": 60.0, "startup_timeout_s": 120.0}
        kw = {k: (v if getattr(self, k) == getattr(c, k) else getattr(self, k)) for k, v in quick.items()}
        if self.url is not None:
            kw.pop("model")
        return ServeBenchConfig(**{**asdict(self), **kw})

    def requests_for(self, concurrency: int) -> int:
        return self.requests if self.requests is not None else max(2 * concurrency, 8)


class BenchError(Exception):
    """A problem the user can fix (the server did not start, the URL does not answer): one line, exit status 2."""


# ---------------------------------------------------------------------------------------------------------------
# pure helpers (unit-tested)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's default);
    None for no values."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100] (got {q})")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {'name{labels}': value}; comments, blank and malformed lines are skipped."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "}" in line:  # label values may hold spaces: split after the closing brace
            key, _, rest = line.rpartition("}")
            key += "}"
        else:
            key, _, rest = line.partition(" ")
        parts = rest.split()
        if not parts:
            continue
        try:
            out[key.strip()] = float(parts[0])  # a trailing timestamp, if any, is ignored
        except ValueError:
            continue
    return out


def metric(metrics: dict[str, float], *names: str) -> float | None:
    """The sum over label sets of the first of `names` present (a counter may be exposed with or without _total)."""
    for name in names:
        series = [v for k, v in metrics.items() if k == name or k.startswith(name + "{")]
        if series:
            return sum(series)
    return None


def _delta(after: dict[str, float], before: dict[str, float], *names: str) -> float | None:
    a, b = metric(after, *names), metric(before, *names)
    return None if a is None or b is None else a - b


# ---------------------------------------------------------------------------------------------------------------
# one request, one level


@dataclass
class RequestResult:
    ok: bool
    error: str | None = None
    latency_s: float | None = None
    ttft_s: float | None = None  # to the first non-empty text chunk
    completion_tokens: int | None = None
    finish_reason: str | None = None
    content_chunks: int = 0


@dataclass
class LevelResult:
    mode: str
    concurrency: int
    planned: int
    results: list[RequestResult] = field(default_factory=list)
    wall_s: float = 0.0
    metrics: dict = field(default_factory=dict)  # deltas from /metrics
    peak_rss_mb: float | None = None  # highest VmRSS sampled during the level
    load: dict = field(default_factory=dict)  # server_cores, client_cores (CPU s / wall s), load_avg_1m at the end


def _payload(cfg: ServeBenchConfig, model_name: str | None, mode: str, index: int, max_tokens: int) -> dict:
    body = {"prompt": PROMPTS[index % len(PROMPTS)], "max_tokens": max_tokens, "seed": cfg.seed + index,
            "stream": True, "stream_options": {"include_usage": True}, "mode": mode}
    if model_name is not None:
        body["model"] = model_name
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if cfg.denoising_steps is not None and mode == "diffusion":
        body["denoising_steps"] = cfg.denoising_steps
    return body


async def send_request(client, url: str, body: dict, ignore_eos: bool, timeout_s: float) -> RequestResult:
    """Stream one completion and judge it complete or lost (see the module docstring)."""
    import httpx

    t0 = time.perf_counter()
    r = RequestResult(ok=False)
    done = False
    usage = None
    try:
        async with asyncio.timeout(timeout_s):
            async with client.stream("POST", url, json=body) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode("utf-8", "replace")
                    r.error = f"HTTP {resp.status_code}: {text[:200]}"
                    return r
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        r.error = f"error event: {chunk['error'].get('message', chunk['error'])}"
                        return r
                    for choice in chunk.get("choices") or ():
                        if choice.get("text"):
                            r.content_chunks += 1
                            if r.ttft_s is None:
                                r.ttft_s = time.perf_counter() - t0
                        if choice.get("finish_reason"):
                            r.finish_reason = choice["finish_reason"]
                    if chunk.get("usage"):
                        usage = chunk["usage"]
    except TimeoutError:
        r.error = f"no complete answer within {timeout_s:g} s"
        return r
    except (httpx.HTTPError, OSError, ValueError, KeyError, AttributeError) as e:  # reset, bad JSON: lost, go on
        r.error = f"{type(e).__name__}: {e}"
        return r
    r.latency_s = time.perf_counter() - t0
    r.completion_tokens = usage.get("completion_tokens") if usage else None
    want = body["max_tokens"]
    if not done:
        r.error = "the stream ended without [DONE]"
    elif r.finish_reason not in ("stop", "length"):
        r.error = f"finish_reason {r.finish_reason!r}"
    elif r.completion_tokens is None:
        r.error = "no usage in the stream"
    elif r.completion_tokens > want or (r.finish_reason == "length" and r.completion_tokens != want):
        r.error = f"{r.completion_tokens} completion tokens for max_tokens {want} (finish_reason {r.finish_reason})"
    elif ignore_eos and r.completion_tokens != want:
        r.error = f"{r.completion_tokens} of {want} tokens although ignore_eos was sent"
    else:
        r.ok = True
    return r


async def run_level(client, base: str, cfg: ServeBenchConfig, model_name: str | None | list[str], mode: str,
                    concurrency: int) -> LevelResult:
    """`concurrency` clients in a closed loop over the level's requests, within the level's time cap. A list of
    model names spreads the requests over them (request i asks for the (i mod n)-th)."""
    level = LevelResult(mode, concurrency, cfg.requests_for(concurrency))
    todo = list(range(level.planned))
    t0 = time.perf_counter()
    deadline = t0 + cfg.level_time_s
    last_end = t0

    async def worker() -> None:
        nonlocal last_end
        while todo and time.perf_counter() < deadline:
            i = todo.pop(0)
            name = model_name[i % len(model_name)] if isinstance(model_name, list) else model_name
            body = _payload(cfg, name, mode, i, cfg.max_tokens)
            level.results.append(await send_request(client, f"{base}/v1/completions", body, cfg.ignore_eos,
                                                    cfg.request_timeout_s))
            last_end = time.perf_counter()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    level.wall_s = last_end - t0
    return level


def summarize(level: LevelResult, canvas_length: int | None) -> dict:
    """The figures of one level (seconds, tokens/s); latencies over complete requests only."""
    good = [r for r in level.results if r.ok]
    tokens = sum(r.completion_tokens for r in good)
    lat = [r.latency_s for r in good]
    ttft = [r.ttft_s for r in good if r.ttft_s is not None]
    out = {"mode": level.mode, "concurrency": level.concurrency, "planned": level.planned,
           "sent": len(level.results), "complete": len(good), "lost": len(level.results) - len(good),
           "skipped": level.planned - len(level.results), "wall_s": level.wall_s, "completion_tokens": tokens,
           "tokens_per_s": tokens / level.wall_s if level.wall_s > 0 and good else None,
           "latency_p50_s": percentile(lat, 50), "latency_p99_s": percentile(lat, 99),
           "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
           "content_chunks_p50": percentile([float(r.content_chunks) for r in good], 50),
           "canvas_latency_p50_s": None, "tpot_p50_s": None, "peak_rss_mb": level.peak_rss_mb,
           "errors": sorted({r.error for r in level.results if r.error})[:5]}
    if level.mode == "diffusion" and canvas_length and good:
        out["canvas_latency_p50_s"] = percentile(
            [r.latency_s / max(1, math.ceil(r.completion_tokens / canvas_length)) for r in good], 50)
    if level.mode == "ar":  # time per output token after the first (diffusion commits whole canvases: see /canvas)
        out["tpot_p50_s"] = percentile([(r.latency_s - r.ttft_s) / (r.completion_tokens - 1) for r in good
                                        if r.ttft_s is not None and r.completion_tokens > 1], 50)
    out.update({k: level.load.get(k) for k in ("server_cores", "client_cores", "load_avg_1m")})
    m = level.metrics
    out.update({k: m.get(k) for k in ("decoder_passes", "encoder_passes", "server_tokens")})
    passes = (m.get("decoder_passes") or 0) + (m.get("encoder_passes") or 0)
    out["tokens_per_forward"] = m["server_tokens"] / passes if passes and m.get("server_tokens") is not None else None
    return out


# ---------------------------------------------------------------------------------------------------------------
# the server process and what is read from it


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_cpu_s(pid: int | None) -> float | None:
    """CPU seconds (user + system) a process has used, from /proc/<pid>/stat; None where it cannot be read."""
    if pid is None:
        return None
    try:
        fields_ = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)
    except (OSError, ValueError, IndexError):
        return None


def read_rss_mb(pid: int) -> tuple[float | None, float | None]:
    """(VmRSS, VmHWM) of a process in MB (MiB), from /proc; (None, None) where it cannot be read."""
    rss = hwm = None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return rss, hwm


class Server:
    """`python -m dgemma.serve` as a child process on 127.0.0.1; stop() terminates it, then kills it."""

    def __init__(self, cfg: ServeBenchConfig):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "dgemma.serve.main", "--host", "127.0.0.1", "--port", str(self.port)]
        if cfg.model is not None:
            cmd += ["--model", cfg.model]
        for flag, value in (("--max-batch", cfg.max_batch), ("--kv-memory-mb", cfg.kv_memory_mb),
                            ("--dtype", cfg.dtype)):
            if value is not None:
                cmd += [flag, str(value)]
        if not cfg.batch_invariant:
            cmd.append("--no-batch-invariant")
        for spec in cfg.lora:
            cmd += ["--lora", spec]
        self.cmd = cmd
        # lives as long as the child (closed, and so deleted, in stop())
        self.log = tempfile.NamedTemporaryFile("w+b", prefix="dgemma-bench-serve-", suffix=".log")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int) -> str:
        """The last non-empty lines the server printed (what went wrong when it died)."""
        self.log.flush()
        self.log.seek(0)
        text = self.log.read().decode("utf-8", "replace")
        return "\n".join([x for x in text.splitlines() if x.strip()][-lines:])

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout_s)
        self.log.close()


async def wait_healthy(client, base: str, timeout_s: float, server: Server | None) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if server is not None and server.proc.poll() is not None:
            raise BenchError(f"the server exited with status {server.proc.returncode} before answering /health: "
                             f"{server.log_tail(1) or '(it printed nothing)'}")
        try:
            r = await client.get(f"{base}/health", timeout=5)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as e:  # not listening yet
            last = f"{type(e).__name__}"
        await asyncio.sleep(0.25)
    tail = f"; the server's last line: {server.log_tail(1)}" if server is not None else ""
    raise BenchError(f"{base}/health did not answer 200 within {timeout_s:g} s (last: {last}){tail}")


async def scrape(client, base: str) -> dict[str, float]:
    """The server's /metrics, parsed; {} if it does not answer (the level's pass counts are then null)."""
    import httpx

    try:
        r = await client.get(f"{base}/metrics", timeout=10)
    except httpx.HTTPError:
        return {}
    return parse_metrics(r.text) if r.status_code == 200 else {}


class RssWatch:
    """Samples the server's resident memory while a level runs: /proc for a child, else /metrics if exported."""

    def __init__(self, client, base: str, pid: int | None, every_s: float):
        self.client, self.base, self.pid, self.every_s = client, base, pid, every_s
        self.level_peak: float | None = None
        self.peak: float | None = None  # highest of VmHWM and every sample
        self._task: asyncio.Task | None = None

    async def sample(self) -> float | None:
        if self.pid is not None:
            rss, hwm = read_rss_mb(self.pid)
            if hwm is not None:
                self.peak = max(self.peak or 0.0, hwm)
            return rss
        value = metric(await scrape(self.client, self.base), "process_resident_memory_bytes")
        return None if value is None else value / 2**20

    async def _loop(self) -> None:
        while True:
            rss = await self.sample()
            if rss is not None:
                self.level_peak = max(self.level_peak or 0.0, rss)
                self.peak = max(self.peak or 0.0, rss)
            await asyncio.sleep(self.every_s)

    def start_level(self) -> None:
        self.level_peak = None
        self._task = asyncio.ensure_future(self._loop())

    async def end_level(self) -> float | None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.sample()  # VmHWM after the level
        return self.level_peak


# ---------------------------------------------------------------------------------------------------------------
# the run


def _git() -> dict:
    rev = git_revision()
    return {"revision": rev or "unknown", "dirty": bool(rev and git_dirty())}


def _device() -> dict:
    import torch  # only for the thread count the server's torch starts with in this environment

    from dgemma.hw import cores_allowed, cpu_name

    return {"cpu": cpu_name(), "cores": cores_allowed(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


def _served_dtype(cfg: ServeBenchConfig) -> str:
    """The weights' dtype the server runs: --dtype, else what the server keeps (the checkpoint's stored dtype,
    float32 for random weights); "unknown" against --url or where config.json does not say."""
    if cfg.dtype is not None:
        return cfg.dtype
    if cfg.url is not None:
        return "unknown"
    if cfg.model is not None and cfg.model.startswith("random:"):
        return "float32"
    folder = Path(cfg.model) if cfg.model is not None else Path(__file__).resolve().parents[2] / "models" / \
        "dgemma-py-small"
    with contextlib.suppress(OSError, ValueError):
        config = json.loads((folder / "config.json").read_text())
        stored = config.get("dtype") or config.get("torch_dtype")
        if stored in ("bfloat16", "float16"):
            import torch

            from dgemma.api import fast_half  # the server's own rule (api.load with dtype None)

            return f"{stored} (stored)" if fast_half(torch.device("cpu")) else f"float32 (stored {stored})"
        if stored:
            return f"{stored} (stored)"
    return "unknown"


def _by_mode(rows: list[dict], key: str) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(r["mode"], {})[str(r["concurrency"])] = r[key]
    return out


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


async def _bench(cfg: ServeBenchConfig, server: Server | None, log) -> dict:
    import httpx

    base = (cfg.url or server.url).rstrip("/")
    limits = httpx.Limits(max_connections=max(cfg.concurrency) + 4, max_keepalive_connections=max(cfg.concurrency))
    # trust_env=False: never route loopback traffic through a proxy from the environment
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(cfg.request_timeout_s, connect=10.0),
                                 trust_env=False) as client:
        t_start = time.perf_counter()
        await wait_healthy(client, base, cfg.startup_timeout_s, server)
        log(f"server healthy at {base} after {time.perf_counter() - t_start:.1f} s")
        card = {}
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
            card = (await client.get(f"{base}/v1/models", timeout=10)).json()["data"][0]
        model_name, canvas = card.get("id"), card.get("canvas_length")
        rss = RssWatch(client, base, server.pid if server else None, every_s=0.2 if server else 1.0)
        rows = []
        for mode in cfg.modes:
            if cfg.warmup:  # first-request costs (lazy init, allocator growth) stay out of the measured levels
                body = _payload(cfg, model_name, mode, 0, min(cfg.max_tokens, 2 * (canvas or 32)))
                w = await send_request(client, f"{base}/v1/completions", body, cfg.ignore_eos, cfg.request_timeout_s)
                if not w.ok:
                    raise BenchError(f"the {mode} warm-up request failed: {w.error}")
        # the modes alternate at each concurrency, so that the two figures compared are measured close in time
        # (this machine is shared: its load drifts over a run)
        adapters = [spec.partition("=")[0] for spec in cfg.lora]
        lora_rows = []
        for c in cfg.concurrency:
            for mode in cfg.modes:
                rows.append(await _measure(client, base, cfg, server, rss, model_name, mode, c, canvas, log))
                if adapters:  # the same level with the requests spread over the base and every adapter
                    row = await _measure(client, base, cfg, server, rss, [model_name, *adapters], mode, c, canvas,
                                         log)
                    row["tokens_per_s_vs_base"] = _ratio(row["tokens_per_s"], rows[-1]["tokens_per_s"])
                    lora_rows.append(row)
        peak = rss.peak
        if server is not None:
            _, hwm = read_rss_mb(server.pid)
            peak = max(peak or 0.0, hwm or 0.0) or None
    return {"rows": rows, "lora_rows": lora_rows, "model_name": model_name, "canvas_length": canvas,
            "peak_rss_mb": peak, "url": base}


async def _measure(client, base: str, cfg: ServeBenchConfig, server: Server | None, rss: RssWatch, model_name,
                   mode: str, c: int, canvas: int | None, log) -> dict:
    """One level (its requests for `model_name`, or spread over a list of names), with the server's metrics, CPU
    and memory around it."""
    before = await scrape(client, base)
    cpu0, own0 = read_cpu_s(server.pid if server else None), time.process_time()
    rss.start_level()
    level = await run_level(client, base, cfg, model_name, mode, c)
    level.peak_rss_mb = await rss.end_level()
    cpu1, own1 = read_cpu_s(server.pid if server else None), time.process_time()
    after = await scrape(client, base)
    # the machine is shared: how many cores the server and this client got, and the load around them
    wall = level.wall_s or None
    level.load = {"server_cores": (cpu1 - cpu0) / wall if cpu0 is not None and wall else None,
                  "client_cores": (own1 - own0) / wall if wall else None,
                  "load_avg_1m": os.getloadavg()[0]}
    level.metrics = {
        "decoder_passes": _delta(after, before, "dgemma_decoder_passes_total", "dgemma_decoder_passes"),
        "encoder_passes": _delta(after, before, "dgemma_encoder_passes_total", "dgemma_encoder_passes"),
        "server_tokens": _delta(after, before, "dgemma_tokens_total", "dgemma_tokens")}
    row = summarize(level, canvas)
    row["models"] = model_name if isinstance(model_name, list) else [model_name]
    spread = f" over {len(model_name)} models" if isinstance(model_name, list) else ""
    log(f"{mode:9s} c={c:<3d}{spread} {row['complete']}/{row['planned']} complete, {row['lost']} lost, "
        f"{_fmt(row['tokens_per_s'], '.1f')} tok/s, p50 {_fmt(row['latency_p50_s'], '.2f')} s ({row['wall_s']:.1f} s)")
    return row


def run(cfg: ServeBenchConfig, log=None) -> dict:
    """Start (or reach) the server, run every level and return the result dict (the JSON line's content)."""
    cfg = cfg.resolved()
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    server = Server(cfg) if cfg.url is None else None
    if server is not None:
        log(f"starting: {' '.join(server.cmd)}")
    try:
        got = asyncio.run(_bench(cfg, server, log))
    finally:
        if server is not None:
            server.stop()
    rows = got["rows"]
    d1 = next((r for r in rows if r["mode"] == "diffusion" and r["concurrency"] == 1), None)
    a1 = next((r for r in rows if r["mode"] == "ar" and r["concurrency"] == 1), None)
    d16 = next((r for r in rows if r["mode"] == "diffusion" and r["concurrency"] == 16), None)
    return {
        "bench": "serve",
        "tokens_per_s": _by_mode(rows, "tokens_per_s"),
        "latency_p50_s": _by_mode(rows, "latency_p50_s"),
        "latency_p99_s": _by_mode(rows, "latency_p99_s"),
        "ttft_p50_s": _by_mode(rows, "ttft_p50_s"),
        "canvas_latency_p50_s": _by_mode([r for r in rows if r["mode"] == "diffusion"], "canvas_latency_p50_s"),
        "tokens_per_forward": _by_mode(rows, "tokens_per_forward"),
        "decoder_passes": _by_mode(rows, "decoder_passes"),
        "lost_requests": sum(r["lost"] for r in rows + got["lora_rows"]),
        # --lora: aggregate tokens/s with the requests spread over the base and the adapters, over the base alone
        "lora_tokens_per_s_vs_base": {f"{r['mode']}@{r['concurrency']}": r["tokens_per_s_vs_base"]
                                      for r in got["lora_rows"]} or None,
        "lora_levels": got["lora_rows"],
        "skipped_requests": sum(r["skipped"] for r in rows),
        "peak_rss_mb": got["peak_rss_mb"],
        "diffusion_vs_ar_latency_c1": _ratio(d1 and d1["latency_p50_s"], a1 and a1["latency_p50_s"]),
        "diffusion_tokens_per_s_c16_vs_c1": _ratio(d16 and d16["tokens_per_s"], d1 and d1["tokens_per_s"]),
        "requests_per_level": {str(c): cfg.requests_for(c) for c in cfg.concurrency},
        "max_tokens": cfg.max_tokens,
        "dtype": _served_dtype(cfg),
        "batch_invariant": cfg.batch_invariant,
        "model": cfg.model if cfg.url is None else got["model_name"],
        "served_model": got["model_name"],
        "canvas_length": got["canvas_length"],
        "url": cfg.url,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "device": _device(),
        "git": _git(),
        "levels": rows,
    }


def _fmt(x, spec: str, unit: str = "") -> str:
    return "-" if x is None else format(x, spec) + unit


def print_table(r: dict) -> None:
    d, g = r["device"], r["git"]
    print(f"dgemma bench serve: model {r['model'] or r['served_model']} ({r['dtype']} dtype), "
          f"max_tokens {r['max_tokens']}, requests per level {r['requests_per_level']}, "
          f"git {g['revision']}{'+dirty' if g['dirty'] else ''}")
    print(f"device: {d['cpu']}, {d['cores']} cores, {d['torch_threads']} torch threads, torch {d['torch']}")
    head = (f"{'mode':9s} {'conc':>4s} {'done':>7s} {'lost':>4s} {'tok/s':>8s} {'ttft50':>7s} {'lat50':>7s} "
            f"{'lat99':>7s} {'/canvas':>7s} {'tpot50':>7s} {'tok/fwd':>7s} {'dec.pass':>8s} {'rss MB':>7s} "
            f"{'srv.cpu':>7s} {'load':>5s}")
    print(head)
    print("-" * len(head))
    for x in r["levels"]:
        print(f"{x['mode']:9s} {x['concurrency']:4d} {x['complete']:>3d}/{x['planned']:<3d} {x['lost']:4d} "
              f"{_fmt(x['tokens_per_s'], '8.1f')} {_fmt(x['ttft_p50_s'], '7.3f')} {_fmt(x['latency_p50_s'], '7.3f')} "
              f"{_fmt(x['latency_p99_s'], '7.3f')} {_fmt(x['canvas_latency_p50_s'], '7.3f'):>7s} "
              f"{_fmt(x['tpot_p50_s'], '7.4f')} {_fmt(x['tokens_per_forward'], '7.2f')} "
              f"{_fmt(x['decoder_passes'], '8.0f')} {_fmt(x['peak_rss_mb'], '7.0f')} "
              f"{_fmt(x['server_cores'], '7.2f')} {_fmt(x['load_avg_1m'], '5.1f')}")
    print("(times in s: ttft = first committed token, lat = whole request, /canvas = diffusion latency per committed "
          "canvas, tpot = per token after the first; tok/fwd = committed tokens per encoder+decoder pass;\n"
          " srv.cpu = cores the server used on average; load = 1-minute load average at the level's end)")
    for x in r.get("lora_levels") or []:
        print(f"{x['mode']:9s} {x['concurrency']:4d} spread over {len(x['models'])} models (base + adapters): "
              f"{x['complete']}/{x['planned']} complete, {_fmt(x['tokens_per_s'], '.1f')} tok/s, "
              f"{_fmt(x['tokens_per_s_vs_base'], '.2f', 'x')} the base alone's")
    print(f"diffusion/AR latency p50 at concurrency 1: {_fmt(r['diffusion_vs_ar_latency_c1'], '.2f', 'x')}   "
          f"diffusion tokens/s at 16 vs 1: {_fmt(r['diffusion_tokens_per_s_c16_vs_c1'], '.2f', 'x')}   "
          f"lost requests: {r['lost_requests']}   skipped (level time cap): {r['skipped_requests']}   "
          f"server peak RSS: {_fmt(r['peak_rss_mb'], '.0f')} MB")


def plot(r: dict, path: Path) -> bool:
    """tokens/s and latency (p50, p99 dashed) against concurrency, both modes; False if matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, color in zip(MODES, ("tab:blue", "tab:orange")):
        rows = [x for x in r["levels"] if x["mode"] == mode and x["tokens_per_s"] is not None]
        if not rows:
            continue
        cs = [x["concurrency"] for x in rows]
        ax1.plot(cs, [x["tokens_per_s"] for x in rows], "o-", color=color, label=mode)
        ax2.plot(cs, [x["latency_p50_s"] for x in rows], "o-", color=color, label=f"{mode} p50")
        ax2.plot(cs, [x["latency_p99_s"] for x in rows], "o--", color=color, alpha=0.6, label=f"{mode} p99")
    levels = sorted({x["concurrency"] for x in r["levels"]})
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent requests")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_ylabel("completion tokens/s (all requests)")
    ax2.set_ylabel(f"request latency, s ({r['max_tokens']} tokens)")
    ax2.set_yscale("log")
    d = r["device"]
    fig.suptitle(f"dgemma serve: {r['model'] or r['served_model']} ({r['dtype']}), {d['cpu']}, {d['cores']} cores, "
                 f"git {r['git']['revision']}", fontsize=9)
    fig.tight_layout()
    try:
        with replacing(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return True


def _default_name(cfg: ServeBenchConfig) -> str:
    if cfg.quick:
        return "quick"
    spec = cfg.model or (cfg.url and "url") or "dgemma-py-small"
    return spec.replace(":", "-") if spec.startswith("random:") else Path(spec).name or "serve"


# ---------------------------------------------------------------------------------------------------------------
# command line


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, e.g. 1,4,16 (got {text!r})") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be positive integers (got {text!r})")
    return values


def _modes(text: str) -> tuple[str, ...]:
    values = tuple(x.strip() for x in text.split(",") if x.strip())
    if not values or any(m not in MODES for m in values):
        raise argparse.ArgumentTypeError(f"must be a comma-separated subset of {','.join(MODES)} (got {text!r})")
    return values


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of `dgemma bench serve` (mirroring ServeBenchConfig); imports nothing heavy."""
    c = ServeBenchConfig()
    p.add_argument("--model", default=c.model, help="checkpoint folder or random:PRESET (default: the bundled model)")
    p.add_argument("--url", default=c.url, help="benchmark a running server at this base URL instead of starting one")
    p.add_argument("--concurrency", type=_int_list, default=c.concurrency,
                   help=f"concurrent requests per level (default {','.join(map(str, c.concurrency))})")
    p.add_argument("--modes", type=_modes, default=c.modes, help="diffusion,ar (default both)")
    p.add_argument("--max-tokens", type=positive_int, default=c.max_tokens,
                   help=f"tokens per request, exactly (default {c.max_tokens})")
    p.add_argument("--requests", type=positive_int, default=c.requests,
                   help="requests per level (default max(2 x concurrency, 8))")
    p.add_argument("--level-time", dest="level_time_s", type=positive_float, default=c.level_time_s,
                   help=f"seconds after which a level starts no more requests (default {c.level_time_s:g})")
    p.add_argument("--request-timeout", dest="request_timeout_s", type=positive_float, default=c.request_timeout_s,
                   help=f"seconds after which a request is lost (default {c.request_timeout_s:g})")
    p.add_argument("--startup-timeout", dest="startup_timeout_s", type=positive_float, default=c.startup_timeout_s,
                   help=f"seconds the server has to answer /health (default {c.startup_timeout_s:g})")
    p.add_argument("--seed", type=seed_int, default=c.seed, help="request i gets seed SEED + i (default 0)")
    p.add_argument("--denoising-steps", type=positive_int, default=c.denoising_steps,
                   help="diffusion requests: most denoising steps per canvas (default: the model's)")
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let requests stop at EOS (then finish_reason stop with fewer tokens is complete)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the unmeasured warm-up requests")
    p.add_argument("--max-batch", type=positive_int, default=c.max_batch, help="server: rows decoded at once")
    p.add_argument("--kv-memory-mb", type=positive_float, default=c.kv_memory_mb, help="server: K/V pool budget, MB")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=c.dtype, help="server: weights dtype")
    p.add_argument("--no-batch-invariant", dest="batch_invariant", action="store_false",
                   help="server: --no-batch-invariant (no padding of small matmuls; AR at low concurrency is faster)")
    p.add_argument("--lora", action="append", default=list(c.lora), metavar="NAME=DIR",
                   help="server: serve this LoRA adapter too (repeatable); every level then also runs with its requests "
                        "spread over the base and the adapters (JSON: lora_tokens_per_s_vs_base)")
    p.add_argument("--out", default=c.out, help=f"folder for NAME.json and NAME.png (default {c.out})")
    p.add_argument("--name", default=c.name, help="output file stem (default: 'quick' or the model folder's name)")
    p.add_argument("--quick", action="store_true",
                   help="CI smoke run: random:tiny, concurrency 1,4, 32 tokens, 4 requests per level")
    return p


def config_from_args(args: argparse.Namespace) -> ServeBenchConfig:
    return ServeBenchConfig(**{f.name: getattr(args, f.name) for f in fields(ServeBenchConfig)})


def run_cli(args: argparse.Namespace) -> int:
    """Run from parsed flags: table, files, JSON line last. 0 if no request was lost, 1 if some were, 2 on a
    user error, 130 on Ctrl-C (the server is stopped in every case)."""
    cfg = config_from_args(args)
    previous = None
    if _main_thread():
        previous = signal.signal(signal.SIGTERM, _sigterm)  # a SIGTERM unwinds like Ctrl-C: the server is stopped
    try:
        result = run(cfg)
    except BenchError as e:
        print(f"dgemma bench serve: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dgemma bench serve: interrupted; the server was stopped", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    name = cfg.name or _default_name(cfg.resolved())
    png = out / f"{name}.png"
    result["files"] = {"json": str(out / f"{name}.json"), "png": str(png) if plot(result, png) else None}
    write_json_atomic(out / f"{name}.json", result, indent=1)
    print_table(result)
    if result["files"]["png"] is None:
        print("(no PNG: matplotlib is not installed; pip install 'dgemma[plot]')")
    print(json.dumps(result, separators=(",", ":")))
    return 0 if result["lost_requests"] == 0 else 1


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _sigterm(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dgemma.bench.serve", description=__doc__.split("\n", 1)[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run_cli(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
