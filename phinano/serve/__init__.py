"""`phinano serve`: one Phi model on localhost behind OpenAI- and Ollama-compatible HTTP APIs (docs/server.md).
FastAPI and uvicorn are an optional extra (`phinano[serve]`); importing this module needs neither.
"""

from __future__ import annotations

import errno
import importlib.util
import logging
import socket
import sys
from pathlib import Path

from ..errors import PhinanoError
from ..formats.ollama import PREFIX as OLLAMA_PREFIX


def check_extra() -> None:
    """A clear error, before a model is loaded, when the `serve` extra is not installed."""
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise PhinanoError(f"phinano serve needs {' and '.join(missing)}: pip install 'phinano[serve]'")


def served_name(model: str) -> str:
    """The name clients use for the model: a local folder's name, a GGUF file's name without `.gguf`, Ollama's
    own name for `ollama:NAME[:TAG]`, else what was given (Hub repo id, nano model name)."""
    path = Path(model)
    if path.is_dir():
        return path.resolve().name
    if path.is_file():
        return path.stem
    return model.removeprefix(OLLAMA_PREFIX)


def bind(host: str, port: int) -> socket.socket:
    """A socket listening on host:port, else a PhinanoError naming the port. The CLI calls it before loading
    the model: a port in use is reported at once, and nothing claims to serve on a port it does not hold."""
    if not 0 <= port <= 65535:
        raise PhinanoError(f"cannot listen on port {port}: ports run from 0 to 65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT
        sock.bind(address)
        sock.listen(2048)  # holds the port; connections wait in the backlog until the server accepts them
        return sock
    except OSError as error:
        why = "it is already in use (choose another with --port)" if error.errno == errno.EADDRINUSE else \
            error.strerror or error
        raise PhinanoError(f"cannot listen on port {port} of {host}: {why}") from None


def serve(model, name: str, sock: socket.socket, max_queue: int = 64, max_request_bytes: int | None = None,
          threads: int | None = None, max_batch: int = 8) -> None:
    """Serve a loaded Model on a socket from `bind` until interrupted (Ctrl-C or SIGTERM).
    threads: kernel threads of the generation thread (default: all cores); max_batch: requests decoded together."""
    check_extra()
    import uvicorn

    from .app import MAX_REQUEST_BYTES, create_app
    from .engine import Engine

    engine = Engine(model, name, max_queue=max_queue, threads=threads, max_batch=max_batch)
    engine.ready.wait()
    app = create_app(engine, max_request_bytes or MAX_REQUEST_BYTES)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    host, port = sock.getsockname()[:2]
    print(f"phinano: serving {name} on http://{f'[{host}]' if ':' in host else host}:{port} "
          f"(OpenAI API under /v1, Ollama API under /api)", file=sys.stderr, flush=True)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=3)).run(sockets=[sock])
    finally:
        engine.close()
        sock.close()
