"""The playground page of `dgemma serve`: GET / races block diffusion against AR decoding of the same weights.

    dgemma serve --model models/dgemma-py-small        # then open http://127.0.0.1:8000/

The page (dgemma/serve/web/: index.html, app.js, style.css; plain HTML, CSS and JavaScript, no build step, nothing fetched
from elsewhere) streams two `/v1/completions` requests at once, `mode: "diffusion"` and `mode: "ar"`, with
`stream_options: {"include_drafts": true, "include_usage": true}`, so it is also the reference client of the
`dgemma_draft` chunks. It shows draft tokens muted, tokens accepted at a step highlighted and committed text solid,
with live figures per pane, and replays files written by `dgemma generate --record` (dgemma/engine/trajectory.py).

Routes added to the app: `GET /` (the page), `GET /playground/{index.html,app.js,style.css}` and
`GET /playground/vocab.json` (the text of every token id, for showing draft canvases token by token).
"""

from __future__ import annotations

import asyncio
from functools import cache
from pathlib import Path

WEB = Path(__file__).resolve().parent / "web"  # package data (pyproject: web/*)

_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}


@cache
def _asset(name: str) -> bytes:
    return (WEB / name).read_bytes()


def add_routes(app, tokenizer) -> None:
    """Serve the page and its files on `app` (a FastAPI app); `tokenizer` decodes the vocabulary for the page."""
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException

    vocab: list[str] = []

    def asset(name: str) -> Response:
        if name not in _FILES:
            raise HTTPException(404, "Not Found")
        return Response(_asset(name), media_type=_FILES[name], headers={"Cache-Control": "no-cache"})

    @app.get("/", include_in_schema=False)
    async def page():
        return asset("index.html")

    @app.get("/playground/vocab.json", include_in_schema=False)
    async def vocabulary():
        if not vocab:  # decoded once, off the event loop (a 262k vocabulary takes a moment)
            vocab.extend(await asyncio.to_thread(lambda: [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]))
        return JSONResponse(vocab, headers={"Cache-Control": "max-age=3600"})

    @app.get("/playground/{name}", include_in_schema=False)
    async def files(name: str):
        return asset(name)
