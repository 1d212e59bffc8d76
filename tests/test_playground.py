"""The playground page of `dgemma serve` (dgemma/serve/playground.py, dgemma/serve/web/) in a real browser.

A live `dgemma serve` on 127.0.0.1 (a subprocess with the bundled model, bounded start-up, stopped by pid) and
Debian's chromium driven by Selenium through chromium-driver (nothing downloads a browser): the page loads, a prompt
is typed and submitted with Ctrl+Enter, both panes finish, the figures are filled in, diffusion took fewer forward
passes than AR, a recorded trajectory replays, and the console holds no JavaScript error. A screenshot is saved in
the test's tmp folder, and also to $DGEMMA_PLAYGROUND_SCREENSHOT when set (the README's docs/playground.png:
`DGEMMA_PLAYGROUND_SCREENSHOT=docs/playground.png .venv/bin/pytest tests/test_playground.py`).

`make test` (its `browser` step) installs chromium and chromium-driver with apt-get where it can; the browser tests skip, saying
why, only where no Chromium is installed. The route tests need no browser.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
from helpers import LiveServer

pytestmark = pytest.mark.slow  # live servers and a browser

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "dgemma-py-small"
SUDOKU = ROOT / "models" / "dgemma-sudoku-6x6"
RACE_S = 420  # both panes; the CPU is shared, and AR takes one forward per token
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@contextlib.contextmanager
def _serve(model: str, folder: Path, *extra: str):
    """A live `dgemma serve` of `model` on 127.0.0.1, stopped by its pid when the block ends."""
    with LiveServer(folder / "server.log", *extra, model=model) as server:
        yield server.url


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("playground")
    model = str(MODEL) if (MODEL / "config.json").is_file() else "random:tiny"
    with _serve(model, folder, "--max-model-len", "1024", "--record-dir", str(folder / "records")) as url:
        yield url, folder / "records"


def test_routes(served):
    server = served[0]
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="pane-diffusion"' in page.text and 'src="/playground/app.js"' in page.text
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css"), ("index.html", "text/html")):
        r = httpx.get(f"{server}/playground/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), name
    # nothing the page loads comes from another host
    for name in ("index.html", "app.js", "style.css"):
        text = httpx.get(f"{server}/playground/{name}").text
        assert "http://" not in text and "https://" not in text, name
    vocab = httpx.get(f"{server}/playground/vocab.json", timeout=60).json()
    assert isinstance(vocab, list) and all(isinstance(p, str) for p in vocab) and len(vocab) > 100
    missing = httpx.get(f"{server}/playground/secret.py")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    assert httpx.get(f"{server}/playground/..%2Fserver.py").status_code == 404
    assert "/" not in httpx.get(f"{server}/openapi.json").json()["paths"]  # the page stays out of the API schema


def test_record_field(served):
    """`record: true` writes each choice's trajectory to --record-dir as ID-INDEX.jsonl; it replays to the text."""
    from dgemma.engine.trajectory import read

    server, records = served
    body = {"prompt": "def add(a, b):", "max_tokens": 40, "seed": 1, "n": 2, "record": True, "ignore_eos": True,
            "denoising_steps": 6}
    r = httpx.post(f"{server}/v1/completions", json=body, timeout=300).json()
    for choice in r["choices"]:
        traj = read(records / f"{r['id']}-{choice['index']}.jsonl")
        assert traj.end["text"] == choice["text"] and traj.end["tokens"] == 40 == len(traj.tokens())
        assert traj.header["params"]["seed"] == 1 + choice["index"] and traj.header["mode"] == "diffusion"
        assert [len(g) for g in traj.canvases()] == traj.end["steps_per_canvas"]
        assert all(len(s["entropy"]) == traj.canvas_length for s in traj.steps)
    # streamed, AR, and stopped by a stop string: the file still ends cleanly
    with httpx.stream("POST", f"{server}/v1/completions", timeout=300, json={
            "prompt": "x = ", "max_tokens": 12, "mode": "ar", "record": True, "stream": True}) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    traj = read(records / f"{chunks[0]['id']}-0.jsonl")
    assert traj.header["mode"] == "ar" and traj.end["text"] == "".join(c["choices"][0]["text"] for c in chunks)
    assert not list(records.glob(".*.tmp"))


def test_record_dropped_on_disconnect(served):
    server, records = served
    body = {"prompt": "x = ", "max_tokens": 200, "mode": "ar", "record": True, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server}/v1/completions", timeout=300, json=body) as s:
        first = json.loads(next(line for line in s.iter_lines() if line.startswith("data: {"))[6:])
    deadline = time.monotonic() + 30
    while list(records.glob(f".{first['id']}-0.jsonl.*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not list(records.glob(f"*{first['id']}*")), "an unfinished recording was left behind"


def test_record_needs_a_record_dir():
    sys.path.insert(0, str(ROOT / "tests"))
    from fake_engine import FakeEngine
    from fastapi.testclient import TestClient

    from dgemma.api import load
    from dgemma.serve.main import build_app

    lm = load("random:tiny")
    with TestClient(build_app(lm, FakeEngine(lm.model))) as client:
        r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 4, "record": True})
        assert client.get("/").status_code == 200
    assert r.status_code == 400 and r.json()["error"]["param"] == "record"
    assert "--record-dir" in r.json()["error"]["message"]


# ---- the browser ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if CHROMIUM is None or DRIVER is None:
        pytest.skip("no Chromium: install Debian's chromium and chromium-driver (`make test` does it with "
                    "apt-get where it can, as root: apt-get install -y chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not fetch drivers or browsers
    profile = tmp_path_factory.mktemp("chromium-profile")
    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1050", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, what, timeout: float, message):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(what, message=message() if callable(message)
                                                                    else message)


def _js_errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _state(driver, kind: str) -> str:
    return driver.find_element("id", f"pane-{kind}").get_attribute("data-state")


def _figures(driver, kind: str) -> dict[str, str]:
    return {k: driver.find_element("id", f"{kind}-{k}").text for k in ("passes", "tpf", "tps", "elapsed")}


def test_race(served, browser, tmp_path):
    server = served[0]
    from selenium.webdriver.common.keys import Keys

    d = browser
    d.get(server + "/")
    _wait(d, lambda d: d.find_element("id", "model-name").text not in ("", "…"), 30, "the model card never loaded")
    prompt = d.find_element("id", "prompt")
    prompt.clear()
    prompt.send_keys("def fibonacci(n):")
    tokens = d.find_element("id", "max-tokens")
    tokens.clear()
    tokens.send_keys("48")
    steps = d.find_element("id", "steps")
    steps.send_keys("16")  # at most 2 x 16 denoising + 2 encoder passes, against AR's 48 (fewer only at an EOS)
    prompt.send_keys(Keys.CONTROL, Keys.ENTER)
    _wait(d, lambda d: _state(d, "diffusion") != "idle", 10, "Ctrl+Enter did not start the race")
    shots = []
    deadline = time.monotonic() + RACE_S
    while time.monotonic() < deadline:
        states = (_state(d, "diffusion"), _state(d, "ar"))
        assert "error" not in states, d.find_element("id", "message").text + " / " + " / ".join(
            d.find_element("id", f"{k}-status").text for k in ("diffusion", "ar"))
        # the README's picture: mid-race, a later canvas some steps into its denoising, beside the AR text
        if not shots and states == ("running", "running") and d.execute_script(
                "const m = /canvas (\\d+), step (\\d+)/.exec(document.getElementById('diffusion-status').textContent);"
                "return m !== null && Number(m[1]) >= 2 && Number(m[2]) >= 4 && "
                "document.querySelectorAll('#diffusion-out .tok').length > 0"):
            shots.append(tmp_path / "playground-race.png")
            d.save_screenshot(str(shots[0]))
        if states == ("done", "done"):
            break
        time.sleep(0.25)
    else:
        pytest.fail(f"the panes did not finish in {RACE_S} s: {states}")
    diffusion, ar = _figures(d, "diffusion"), _figures(d, "ar")
    for figures in (diffusion, ar):
        assert "–" not in figures.values(), figures
        assert float(figures["tpf"]) > 0 and float(figures["tps"]) > 0 and figures["elapsed"].endswith(" s")
    assert int(diffusion["passes"]) < int(ar["passes"]), (diffusion, ar)
    assert float(diffusion["tpf"]) > float(ar["tpf"])
    for kind in ("diffusion", "ar"):
        assert d.find_element("id", f"{kind}-out").text.strip(), f"the {kind} pane shows no text"
    assert d.find_elements("css selector", "#diffusion-out .tok") == []  # finished: committed text only
    assert "forward passes" in d.find_element("id", "message").text
    shot = tmp_path / "playground.png"
    d.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    target = os.environ.get("DGEMMA_PLAYGROUND_SCREENSHOT")
    if target:  # the mid-race picture when the polling caught one, else the finished race
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shots[0] if shots else shot, target)
    assert _js_errors(d) == []


def test_replay_the_readme_trajectory(served, browser):
    """docs/trajectory.jsonl (a real run of the bundled model) replays to its recorded text."""
    from dgemma.engine.trajectory import read

    path = ROOT / "docs" / "trajectory.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    d = browser
    d.get(served[0] + "/")
    d.find_element("id", "speed").send_keys("20")
    d.find_element("id", "trajectory").send_keys(str(path))
    _wait(d, lambda d: _state(d, "diffusion") in ("done", "error"), 60, lambda: d.find_element("id", "message").text)
    traj = read(path)
    shown = d.execute_script("return document.getElementById('diffusion-out').textContent")
    assert _state(d, "diffusion") == "done" and shown == "".join(traj.piece(i) for i in traj.tokens())
    assert d.find_element("id", "diffusion-passes").text == str(len(traj.steps) + len(traj.canvases()))
    assert _js_errors(d) == []


def _write_trajectory(path: Path) -> str:
    from dgemma.engine.trajectory import Recorder
    from dgemma.params import Draft

    class Tok:
        def decode(self, ids):
            return "".join({1: "def", 2: " f", 3: "():", 4: " pass", 5: "\n"}.get(i, "?") for i in ids)

    with Recorder(path) as rec:
        rec.header("hand-made", "diffusion", "x", [7], 4, {"seed": 0})
        rec.step(Draft(0, 0, 1, [1, 9, 3, 9], [True, False, True, False], 1.2, [0.01, 2.0, 0.02, 2.2], 0.8))
        rec.step(Draft(0, 0, 2, [1, 2, 3, 4], [True, True, True, True], 0.01, [0.0, 0.01, 0.0, 0.0], 0.4))
        rec.commit(0, 0, [1, 2, 3, 4])
        rec.step(Draft(4, 1, 1, [5, 9, 9, 9], [True, False, False, False], 1.5, [0.0, 2.0, 2.0, 2.0], 0.8))
        rec.step(Draft(4, 1, 2, [5, 1, 2, 3], [True, True, True, True], 0.0, [0.0, 0.0, 0.0, 0.0], 0.4))
        rec.commit(1, 4, [5, 1, 2])
        rec.end(Tok(), "length", [1, 2, 3, 4, 5, 1, 2], decoder_passes=4, encoder_passes=2, steps_per_canvas=[2, 2])
    return Tok().decode([1, 2, 3, 4, 5, 1, 2])


def test_replay_a_trajectory(served, browser, tmp_path):
    server = served[0]
    d = browser
    d.get(server + "/")
    path = tmp_path / "hand.jsonl"
    text = _write_trajectory(path)
    d.find_element("id", "speed").send_keys("5")
    d.find_element("id", "trajectory").send_keys(str(path))
    _wait(d, lambda d: _state(d, "diffusion") == "done", 30, lambda: d.find_element("id", "message").text)
    assert d.find_element("id", "diffusion-out").text == text
    figures = _figures(d, "diffusion")
    assert figures["passes"] == "6" and figures["tpf"] == f"{7 / 6:.2f}", figures  # 4 denoising + 2 encoder
    # a truncated file: the message names the line
    cut = tmp_path / "cut.jsonl"
    cut.write_text("\n".join(path.read_text().splitlines()[:-1]) + "\n")
    d.find_element("id", "trajectory").send_keys(str(cut))
    _wait(d, lambda d: "without its end record" in d.find_element("id", "message").text, 10,
          lambda: d.find_element("id", "message").text)
    assert "line 7" in d.find_element("id", "message").text
    (tmp_path / "foreign.jsonl").write_text(json.dumps({"prompt": "x"}) + "\n")
    d.find_element("id", "trajectory").send_keys(str(tmp_path / "foreign.jsonl"))
    _wait(d, lambda d: "foreign.jsonl line 1 is not a trajectory record" in d.find_element("id", "message").text, 10,
          lambda: d.find_element("id", "message").text)
    assert _js_errors(d) == []


def test_sudoku_race(browser, tmp_path_factory):
    """A Sudoku model: the page draws two grids, diffusion filling every cell over a few passes and AR cell by cell,
    and says whether each grid is solved; the verdicts agree with dgemma's own checker on the same completions."""
    if not (SUDOKU / "config.json").is_file():
        pytest.skip(f"{SUDOKU} is missing")
    from dgemma.tasks.sudoku import check_solution

    puzzle = (SUDOKU / "test_puzzles.txt").read_text().split()[0]
    d = browser
    with _serve(str(SUDOKU), tmp_path_factory.mktemp("sudoku")) as url:
        d.get(url + "/")
        _wait(d, lambda d: "Sudoku 6x6" in d.find_element("id", "model-info").text, 30, "no Sudoku view")
        assert d.find_element("id", "max-tokens").get_attribute("value") == "36"
        prompt = d.find_element("id", "prompt")
        prompt.clear()
        prompt.send_keys(puzzle)
        givens = sum(c.isdigit() for c in puzzle)
        assert len(d.find_elements("css selector", "#diffusion-out .cell.given")) == givens
        d.find_element("id", "run").click()
        _wait(d, lambda d: (_state(d, "diffusion"), _state(d, "ar")) == ("done", "done") or "error" in
              (_state(d, "diffusion"), _state(d, "ar")), RACE_S, lambda: d.find_element("id", "message").text)
        assert (_state(d, "diffusion"), _state(d, "ar")) == ("done", "done"), d.find_element("id", "message").text
        for kind in ("diffusion", "ar"):
            cells = d.find_elements("css selector", f"#{kind}-out .cell")
            assert len(cells) == 36 and all(c.text.strip() for c in cells), kind  # every cell filled
            grid = "".join(c.text.strip() for c in cells)
            r = httpx.post(f"{url}/v1/completions", timeout=120,
                           json={"prompt": puzzle, "max_tokens": 36, "seed": 0, "mode": kind}).json()
            assert grid == r["choices"][0]["text"].strip(), kind  # the page shows the served completion
            shown = d.find_element("id", f"{kind}-solved").text
            assert shown == ("yes" if check_solution(puzzle, grid) is None else "no"), (kind, grid, shown)
        diffusion, ar = _figures(d, "diffusion"), _figures(d, "ar")
        assert int(diffusion["passes"]) < int(ar["passes"]), (diffusion, ar)
        assert "solved" in d.find_element("id", "message").text
        shot = os.environ.get("DGEMMA_PLAYGROUND_SUDOKU_SCREENSHOT")
        if shot:
            d.save_screenshot(shot)
        assert _js_errors(d) == []
