"""The HTTP routes of `phinano serve`: a FastAPI app over one Engine.

    GET  /v1/models                  POST /v1/chat/completions     POST /v1/completions     (OpenAI)
    GET  /api/tags   GET /api/version   POST /api/generate   POST /api/chat                   (Ollama)

Each POST route reads the body itself (size limit, JSON errors in the API's own shape, any Content-Type, as
`curl -d` sends), lets server_openai / server_ollama turn it into a Job, queues it on the engine, and either
streams the job's events (SSE or NDJSON) or waits for the end. A client that hangs up cancels its job: a
streaming response is cancelled by Starlette when the connection drops, a waiting one polls for it.

Errors never leave as a traceback: ApiError, unknown routes and unexpected exceptions all become the JSON
error object of the API the request came in by (OpenAI's under /v1, Ollama's elsewhere).
"""

from __future__ import annotations

import asyncio
import json
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from . import __version__, server_ollama, server_openai
from .server_engine import ApiError, Done, Engine, Job

log = logging.getLogger("phinano.server")
MAX_REQUEST_BYTES = 4 * 1024 * 1024


class JobStream(StreamingResponse):
    """A streamed reply whose job is cancelled however the response ends: finished, failed or hung up on."""

    def __init__(self, content, job: Job, media_type: str):
        super().__init__(content, media_type=media_type, headers={"Cache-Control": "no-cache"})
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


def create_app(engine: Engine, max_request_bytes: int = MAX_REQUEST_BYTES) -> FastAPI:
    app = FastAPI(title="phinano", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    # ------------------------------------------------------------------ errors, in each API's own shape
    def error(request: Request, status: int, message: str, param=None, code=None) -> JSONResponse:
        api = server_openai if request.url.path.startswith("/v1/") else server_ollama
        return JSONResponse(api.error_body(status, message, param, code), status_code=status)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error(request, exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(HTTPException)  # unknown route, wrong method
    async def http_error(request: Request, exc: HTTPException):
        return error(request, exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error(request, 500, "internal server error")

    async def read_json(request: Request) -> object:
        """The decoded body; 413 past the size limit, 400 if it is not JSON."""
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_request_bytes:
            raise ApiError(413, f"request body of {length} bytes is over the limit of {max_request_bytes} bytes",
                           code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_request_bytes:
                raise ApiError(413, f"request body is over the limit of {max_request_bytes} bytes",
                               code="request_too_large")
        try:
            data = json.loads(body)
            json.dumps(data, ensure_ascii=False).encode("utf-8")  # lone surrogates ("\ud800") are not text
        except (ValueError, RecursionError) as exc:  # UnicodeError is a ValueError
            raise ApiError(400, f"We could not parse the JSON body of your request: {exc}",
                           code="invalid_json") from None
        return data

    async def finish(request: Request, job: Job):
        """Wait for the whole generation; None (and the job cancelled) if the client hangs up meanwhile."""
        result = asyncio.ensure_future(job.result())
        try:
            while not result.done():
                await asyncio.wait({result}, timeout=0.25)
                if not result.done() and await request.is_disconnected():
                    return None
            return result.result()
        finally:
            job.cancel()
            result.cancel()

    # ------------------------------------------------------------------ OpenAI
    async def openai_route(request: Request, make_job):
        job, reply = await run_in_threadpool(make_job, engine, await read_json(request))
        engine.submit(job)
        if reply.stream:
            return JobStream(server_openai.sse(reply, job), job, "text/event-stream")
        outcome = await finish(request, job)
        if outcome is None:
            return Response(status_code=499)  # nobody is listening
        text, logprobs, end = outcome
        if not isinstance(end, Done):
            return error(request, 500, end.message)
        return server_openai.response(reply, text, logprobs, end)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await openai_route(request, server_openai.chat_job)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await openai_route(request, server_openai.completion_job)

    @app.get("/v1/models")
    async def models():
        return server_openai.models(engine)

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if not engine.serves(model_id):
            raise ApiError(404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found")
        return server_openai.model_card(engine)

    # ------------------------------------------------------------------ Ollama
    async def ollama_route(request: Request, make_job):
        job, reply = await run_in_threadpool(make_job, engine, await read_json(request))
        if job is None:  # empty prompt / messages: "load the model"
            return server_ollama.load_reply(reply)
        engine.submit(job)
        if reply.stream:
            return JobStream(server_ollama.ndjson(reply, job), job, "application/x-ndjson")
        outcome = await finish(request, job)
        if outcome is None:
            return Response(status_code=499)
        text, logprobs, end = outcome
        if not isinstance(end, Done):
            return error(request, 500, end.message)
        return server_ollama.response(reply, text, logprobs, end)

    @app.post("/api/generate")
    async def generate(request: Request):
        return await ollama_route(request, server_ollama.generate_job)

    @app.post("/api/chat")
    async def chat(request: Request):
        return await ollama_route(request, server_ollama.chat_job)

    @app.get("/api/tags")
    async def tags():
        return server_ollama.tags(engine)

    @app.get("/api/version")
    async def version():
        return {"version": __version__}

    @app.api_route("/", methods=["GET", "HEAD"])
    async def root():
        return PlainTextResponse("phinano is running")

    return app
