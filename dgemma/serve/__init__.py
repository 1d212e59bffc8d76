"""`dgemma serve`: the OpenAI-compatible HTTP server. main.py (flags, start-up), app.py (routes, schemas, streaming,
metrics), loop.py (the engine's thread), text.py (text in and out), playground.py and web/ (the browser page)."""
