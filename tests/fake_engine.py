"""A scripted stand-in for dgemma.engine.engine.Engine with the same add / step / abort contract, for the server tests.

    python -m dgemma.serve --model random:tiny --engine-factory fake_engine:FakeEngine     (tests/ on PYTHONPATH)
    python -m dgemma.serve --model random:tiny --engine-factory fake_engine:slow          (10 ms per step)

Output is a pure function of (prompt ids, seed, mode): token j of a request is the j-th draw of a generator seeded
by them, so the same request gives the same ids whoever else is running. Diffusion commits a canvas of C tokens
(fewer for the last, so max_new_tokens is exact) after `max_denoising_steps` steps, with a Draft after each step
when asked; ar commits one token per step; each row's first step is its prefill. A seed of 10**6 + k (0 <= k < 1000)
ends the request with EOS after k tokens (the EOS id is included in new_ids, finish_reason "stop"); otherwise EOS
never appears. Rows beyond max_batch wait; waiting requests beyond max_queue raise QueueFull.
"""

from __future__ import annotations

import os
import random
import time
from collections import deque
from dataclasses import dataclass, field

from dgemma.params import Draft, EngineConfig, Event, QueueFull, Request, RequestError

FIRST_ID = 263  # past the specials and the 256 byte tokens of the bundled tokenizer: whole-character pieces
EOS_SEED = 10**6


@dataclass
class _Row:
    req: Request
    seed: int
    eos_at: int | None  # position of a scripted EOS
    rng: random.Random
    tokens: list[int] = field(default_factory=list)  # drawn so far (a prefix of the request's script)
    committed: int = 0
    prefilled: bool = False
    canvas_index: int = -1
    step: int = 0  # steps done in the open canvas
    passes: int = 0


class FakeEngine:
    def __init__(self, model, config: EngineConfig | None = None, step_s: float = 0.0):
        mc = model.config
        self.config = (config or EngineConfig()).validate()
        self.C, self.V = mc.canvas_length, mc.vocab_size
        self.max_model_len = min(self.config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        self.step_s = step_s
        self.waiting: deque[_Row] = deque()
        self.running: dict[str, _Row] = {}
        self.counters = {"steps": 0, "decoder_passes": 0, "encoder_passes": 0, "tokens": 0, "aborted": 0}

    # ---- the contract -------------------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        p = request.params.validate()
        ids = request.prompt_ids
        if request.request_id in self.running or any(r.req.request_id == request.request_id for r in self.waiting):
            raise RequestError(f"request id {request.request_id!r} is already in the engine")
        if not ids or not all(isinstance(t, int) and 0 <= t < self.V for t in ids):
            raise RequestError(f"prompt ids must be a non-empty list of integers in [0, {self.V})")
        whole = -(-p.max_new_tokens // self.C) * self.C if p.mode == "diffusion" else p.max_new_tokens
        if len(ids) + whole > self.max_model_len:
            raise RequestError(f"prompt of {len(ids)} tokens + max_new_tokens={p.max_new_tokens} needs "
                               f"{len(ids) + whole} positions, over {self.max_model_len}")
        if len(self.waiting) >= self.config.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests are waiting (max_queue={self.config.max_queue})")
        seed = p.seed if p.seed is not None else random.SystemRandom().randrange(2**62)
        script = random.Random(f"{p.mode}:{seed}:{','.join(map(str, ids))}")
        eos_at = seed - EOS_SEED if p.seed is not None and 0 <= seed - EOS_SEED < 1000 else None
        self.waiting.append(_Row(request, seed, eos_at, script))

    def abort(self, request_id: str) -> bool:
        if self.running.pop(request_id, None) is not None:
            self.counters["aborted"] += 1
            return True
        for row in self.waiting:
            if row.req.request_id == request_id:
                self.waiting.remove(row)
                self.counters["aborted"] += 1
                return True
        return False

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def metrics(self) -> dict:
        return {"waiting": len(self.waiting), "running": len(self.running), **self.counters}

    def step(self) -> list[Event]:
        while self.waiting and len(self.running) < self.config.max_batch:
            row = self.waiting.popleft()
            self.running[row.req.request_id] = row
        if not self.running:
            return []
        if self.step_s:
            time.sleep(self.step_s)
        self.counters["steps"] += 1
        events, encoder, decoder = [], False, False
        for rid, row in list(self.running.items()):
            row.passes += 1
            if not row.prefilled:
                row.prefilled, encoder = True, True
                continue
            if row.req.params.mode == "ar":
                encoder = True
                event = self._commit(row, 1)
            else:
                decoder = True
                event = self._denoise(row)
            if event is not None:
                events.append(event)
                if event.finished:
                    del self.running[rid]
        self.counters["encoder_passes"] += encoder
        self.counters["decoder_passes"] += decoder
        return events

    # ---- the script ---------------------------------------------------------------------------------------------
    def _token(self, row: _Row, j: int) -> int:
        while len(row.tokens) <= j:
            eos = row.req.params.eos_token_ids
            if eos and len(row.tokens) == row.eos_at:
                row.tokens.append(eos[0])
            else:
                row.tokens.append(row.rng.randrange(FIRST_ID, self.V))
        return row.tokens[j]

    def _canvas_len(self, row: _Row) -> int:
        return min(self.C, row.req.params.max_new_tokens - row.committed)

    def _denoise(self, row: _Row) -> Event | None:
        p = row.req.params
        if row.step == 0:
            row.canvas_index += 1
        row.step += 1
        n = self._canvas_len(row)
        event = None
        if p.drafts:
            final = [self._token(row, row.committed + k) for k in range(n)]
            done = n * row.step // p.max_denoising_steps  # positions settled after this step
            before = n * (row.step - 1) // p.max_denoising_steps
            ids = final[:done] + [FIRST_ID + (t * 7 + row.step) % (self.V - FIRST_ID) for t in final[done:]]
            draft = Draft(row.committed, row.canvas_index, row.step, ids + [0] * (self.C - n),
                          [before <= k < done for k in range(self.C)], 1.0 / row.step)
            event = Event(row.req.request_id, draft=draft, prompt_tokens=len(row.req.prompt_ids),
                          completion_tokens=row.committed, decoder_passes=row.passes)
        if row.step < p.max_denoising_steps:
            return event
        row.step = 0
        done = self._commit(row, n)
        if event is not None:
            done.draft = event.draft
        return done

    def _commit(self, row: _Row, n: int) -> Event:
        p = row.req.params
        new = []
        for _ in range(n):
            t = self._token(row, row.committed)
            new.append(t)
            row.committed += 1
            if p.eos_token_ids and t in p.eos_token_ids:
                break
        self.counters["tokens"] += len(new)
        eos = bool(p.eos_token_ids) and new[-1] in p.eos_token_ids
        finished = eos or row.committed >= p.max_new_tokens
        return Event(row.req.request_id, new_ids=new, finished=finished,
                     finish_reason=("stop" if eos else "length") if finished else None,
                     prompt_tokens=len(row.req.prompt_ids), completion_tokens=row.committed, decoder_passes=row.passes)


def slow(model, config: EngineConfig | None = None) -> FakeEngine:
    """10 ms per step: streams long enough to disconnect from and queues that fill."""
    return FakeEngine(model, config, step_s=float(os.environ.get("DGEMMA_FAKE_STEP_S", "0.01")))
