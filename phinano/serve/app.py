"""The HTTP side of `phinano serve`: a FastAPI app over one Engine. Errors never leave as a traceback but in the
shape of the API the request came in by.
"""

from __future__ import annotations

import asyncio
import json
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .. import __version__
from . import ollama_api, openai_api
from .engine import Busy, Done, Engine, Failed, Job
from .validate import ApiError, check_model

log = logging.getLogger("phinano.serve")
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

    async def error(request: Request, exc: Exception) -> JSONResponse:
        """Every error in the shape of the API the request came in by: OpenAI's under /v1/, Ollama's elsewhere."""
        if isinstance(exc, HTTPException):  # unknown route, wrong method
            exc = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
        elif not isinstance(exc, ApiError):
            log.exception("unexpected error on %s", request.url.path)
            exc = ApiError(500, "internal server error")
        api = openai_api if request.url.path.startswith("/v1/") else ollama_api
        return JSONResponse(api.error_body(exc), status_code=exc.status)

    for kind in (ApiError, HTTPException, Exception):
        app.add_exception_handler(kind, error)

    async def read_json(request: Request) -> object:
        """The decoded body; 413 past the size limit (counted as it arrives), 400 if it is not JSON."""
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_request_bytes:
                raise ApiError(413, f"the request body is over the limit of {max_request_bytes} bytes",
                               code="request_too_large")
        try:
            data = json.loads(body)
            json.dumps(data, ensure_ascii=False).encode("utf-8")  # lone surrogates ("\ud800") are not text
        except (ValueError, RecursionError) as exc:  # UnicodeError is a ValueError
            raise ApiError(400, f"We could not parse the JSON body of your request: {exc}",
                           code="invalid_json") from None
        return data

    async def finish(request: Request, job: Job) -> Done | Failed | None:
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

    def generation(api, kind: str):
        """The route of one generation endpoint: read the body (any Content-Type, as `curl -d` sends), let `api`
        (a module) turn it into a job, queue it, then stream its events or wait for the end and shape the reply."""
        async def route(request: Request):
            job, reply = await run_in_threadpool(api.job, kind, engine, await read_json(request))
            if job is None:  # Ollama's "load the model": nothing to generate
                return api.response(reply, None)
            try:
                engine.submit(job)
            except Busy as busy:
                raise ApiError(503, str(busy), code="server_busy") from None
            if reply.stream:
                return JobStream(api.stream(reply, job), job, api.MEDIA_TYPE)
            end = await finish(request, job)
            if end is None:
                return Response(status_code=499)  # nobody is listening
            if isinstance(end, Failed):
                raise ApiError(500, end.message)
            return api.response(reply, end)
        return route

    app.post("/v1/chat/completions")(generation(openai_api, "chat"))
    app.post("/v1/completions")(generation(openai_api, "completion"))
    app.post("/api/chat")(generation(ollama_api, "chat"))
    app.post("/api/generate")(generation(ollama_api, "generate"))

    app.get("/v1/models")(lambda: {"object": "list", "data": [openai_api.model_card(engine)]})
    app.get("/api/tags")(lambda: ollama_api.tags(engine))
    app.get("/api/version")(lambda: {"version": __version__})
    app.api_route("/", methods=["GET", "HEAD"])(lambda: PlainTextResponse("phinano is running"))

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        check_model(engine, model_id)
        return openai_api.model_card(engine)

    return app
