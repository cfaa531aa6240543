"""`phinano serve`: one Phi model on localhost behind OpenAI- and Ollama-compatible HTTP APIs.

    phinano serve --model microsoft/Phi-3-mini-4k-instruct            # http://127.0.0.1:8000
    curl http://127.0.0.1:8000/v1/chat/completions -d '{"model": "microsoft/Phi-3-mini-4k-instruct",
         "messages": [{"role": "user", "content": "Hi!"}]}'

The stack is FastAPI on uvicorn, the pair Python users expect of a web service (an optional extra:
`pip install 'phinano[serve]'`). The pieces: server_engine.py (the queue and the worker thread that runs the
model), server_openai.py and server_ollama.py (request and response shapes), server_app.py (the routes).
This module only loads the model and runs uvicorn, so importing it needs no extra.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

from .errors import PhinanoError


def check_extra() -> None:
    """A clear error, before a model is loaded, when the `serve` extra is not installed."""
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise PhinanoError(f"phinano serve needs {' and '.join(missing)}: pip install 'phinano[serve]'")


def served_name(model: str) -> str:
    """The name clients use for the model: a local folder's name, else what was given (repo id, nano name)."""
    path = Path(model)
    return path.resolve().name if path.is_dir() else model


def serve(model, name: str, host: str = "127.0.0.1", port: int = 8000, max_queue: int = 64,
          max_request_bytes: int | None = None, threads: int | None = None) -> None:
    """Serve a loaded phinano Model until interrupted (Ctrl-C or SIGTERM). threads: kernel threads of the
    generation thread (default: all cores)."""
    check_extra()
    import uvicorn

    from .server_app import MAX_REQUEST_BYTES, create_app
    from .server_engine import Engine

    engine = Engine(model, name, max_queue=max_queue, threads=threads)
    engine.wait_ready()
    app = create_app(engine, max_request_bytes or MAX_REQUEST_BYTES)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    print(f"phinano: serving {name} on http://{host}:{port} (OpenAI API under /v1, Ollama API under /api)",
          file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=3)
    finally:
        engine.close()

