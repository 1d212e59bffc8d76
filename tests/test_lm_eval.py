"""lm-evaluation-harness against a live `dgemma serve` (random:tiny, 127.0.0.1): its three kinds of request.

The tasks are lm-eval YAML over local JSONL (tests/lm_eval_tasks/): a multiple-choice task scored by log-likelihood,
a loglikelihood_rolling perplexity task and a generate_until task. Nothing is downloaded: the data are local files
(HF_DATASETS_OFFLINE), the tokenizer is the bundled tokenizer.json in a temporary folder (HF_HUB_OFFLINE).

- AR server (`--mode ar`): all three. Log-likelihood requests send token ids (tokenized_requests=True, lm-eval's
  own tokenizer = the model's), with echo, logprobs=1 and max_tokens=1, as lm-eval 0.4.13 does.
- diffusion server (the default mode): all three as well. A log-likelihood request's generated token is a
  diffusion canvas's first token (with its logprob under the denoiser); lm-eval scores only the echoed prompt.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import LiveServer

pytestmark = pytest.mark.slow  # lm-eval against live servers

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'dgemma[eval]')")

ROOT = Path(__file__).resolve().parent.parent
TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"
LOGLIKELIHOOD_TASKS = ("dgemma_py_mc", "dgemma_py_ppl")
RUN_S = 600


class _Server(LiveServer):
    def __init__(self, log: Path, *args: str):
        super().__init__(log, "--max-model-len", "1024", *args)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The bundled tokenizer as a folder transformers' AutoTokenizer reads (lm-eval's huggingface backend)."""
    d = tmp_path_factory.mktemp("tokenizer")
    shutil.copy(ROOT / "dgemma" / "assets" / "tokenizer.json", d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "add_bos_token": False}))
    return d


def _lm_eval(tmp: Path, url: str, tasks: tuple[str, ...], tokenizer: str) -> dict:
    out = tmp / "results"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp / "datasets"), "HF_HOME": str(tmp / "hf"), "TOKENIZERS_PARALLELISM": "false",
           "OPENAI_API_KEY": "none"}
    args = f"model=random:tiny,base_url={url}/v1/completions,{tokenizer},max_length=512,num_concurrent=1,max_retries=1"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", args, "--tasks", ",".join(tasks), "--include_path", str(TASKS), "--limit", "4",
           "--output_path", str(out)]
    # cwd: the tasks' data_files are relative to it
    done = subprocess.run(cmd, check=False, cwd=TASKS, env=env, capture_output=True, text=True, timeout=RUN_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    files = sorted(out.rglob("results_*.json"))
    assert files, f"no results file under {out}:\n{done.stderr[-3000:]}"
    return json.loads(files[-1].read_text())["results"]


def _numbers(results: dict, task: str, metrics: tuple[str, ...]) -> None:
    got = results[task]
    for m in metrics:
        value = got[f"{m},none"]
        assert isinstance(value, (int, float)) and math.isfinite(value), (task, m, got)


def test_lm_eval_ar_all_request_kinds(tmp_path, tokenizer_dir):
    server = _Server(tmp_path / "server.log", "--mode", "ar")
    try:
        tok = f"tokenizer_backend=huggingface,tokenizer={tokenizer_dir},tokenized_requests=True"
        results = _lm_eval(tmp_path, server.url, (*LOGLIKELIHOOD_TASKS, "dgemma_py_gen"), tok)
    finally:
        server.stop()
    _numbers(results, "dgemma_py_mc", ("acc",))
    _numbers(results, "dgemma_py_ppl", ("word_perplexity", "byte_perplexity", "bits_per_byte"))
    _numbers(results, "dgemma_py_gen", ("exact_match",))
    assert results["dgemma_py_ppl"]["bits_per_byte,none"] > 0


def test_lm_eval_diffusion_all_request_kinds(tmp_path, tokenizer_dir):
    server = _Server(tmp_path / "server.log")  # diffusion: the default mode
    try:
        tok = f"tokenizer_backend=huggingface,tokenizer={tokenizer_dir},tokenized_requests=True"
        results = _lm_eval(tmp_path, server.url, (*LOGLIKELIHOOD_TASKS, "dgemma_py_gen"), tok)
    finally:
        server.stop()
    _numbers(results, "dgemma_py_mc", ("acc",))
    _numbers(results, "dgemma_py_ppl", ("word_perplexity", "byte_perplexity", "bits_per_byte"))
    _numbers(results, "dgemma_py_gen", ("exact_match",))
