"""The HTTP layer: an OpenAI-compatible FastAPI app over one Engine. Handlers validate and
tokenize, submit to the engine, and turn its events into JSON or server-sent events. Every
failure is an OpenAI-style JSON error with a 4xx/5xx status; nothing a client sends crashes it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import EmbeddingJob, Engine, EngineStopped, Limits, QueueFull, Sampling, Sequence
from .loader import EMBED, GENERATE, LoadedModel
from .metrics import Metrics
from .protocol import APIError, ChatRequest, CompletionRequest, EmbeddingRequest, parse

MAX_BODY_BYTES = 4 << 20
GRACE_SECONDS = 2.0  # the engine enforces deadlines itself; the handler waits this much longer


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


class _Events:
    """An asyncio queue that the engine thread feeds; events are tagged with the choice index."""

    def __init__(self, deadline: float):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.deadline = deadline

    def sink(self, index: int):
        return lambda event: self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

    async def next(self) -> tuple[int, tuple]:
        remaining = self.deadline + GRACE_SECONDS - time.monotonic()
        try:
            return await asyncio.wait_for(self.queue.get(), timeout=max(remaining, 0.001))
        except asyncio.TimeoutError:
            raise APIError(503, "the request timed out", code="timeout") from None


def build_app(loaded: LoadedModel, limits: Limits | None = None) -> FastAPI:
    limits = limits or Limits()
    metrics = Metrics(loaded.name)
    engine = Engine(loaded, limits, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="sparseflow", lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.limits = engine, metrics, limits

    @app.middleware("http")
    async def count(request: Request, call_next):
        t0 = time.perf_counter()
        endpoint = request.url.path if request.url.path in KNOWN_PATHS else "other"
        status = "500"  # call_next raising: the server-error handler (outside this middleware) answers 500
        try:
            response = await call_next(request)
            status = str(response.status_code)
            return response
        finally:
            metrics.requests.labels(endpoint, status).inc()
            metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - t0)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return _error(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return _error(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}"))

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        return _error(APIError(500, f"internal error: {type(e).__name__}: {e}"))

    async def read_body(request: Request, kind):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is {size} bytes; the limit is {MAX_BODY_BYTES}")
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES}")
        try:
            body = json.loads(raw)
            json.dumps(body, ensure_ascii=False).encode("utf-8")  # (\ud800 escapes: text no tokenizer takes)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        except UnicodeEncodeError as e:
            raise APIError(400, f"the request body holds text that is not valid Unicode ({e.reason}: "
                           f"{e.object[e.start:e.end]!a})") from None
        except RecursionError:  # (nested deeper than the parser's stack)
            raise APIError(400, "the request body is not valid JSON: nested too deeply") from None
        req = parse(kind, body)
        if req.model != loaded.name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {loaded.name!r}",
                           param="model", code="model_not_found")
        return req

    def check_tokens(ids: list[int], max_new: int = 0, param: str = "input") -> list[int]:
        if not ids:
            raise APIError(400, f"the {param} is empty", param=param)
        if len(ids) > limits.max_input_tokens:
            raise APIError(413, f"the input has {len(ids)} tokens; the limit is {limits.max_input_tokens}",
                           code="context_length_exceeded")
        if len(ids) + max_new > loaded.max_positions:
            if not max_new:  # (embeddings: the input alone)
                raise APIError(400, f"{len(ids)} input tokens exceed the model's {loaded.max_positions} positions",
                               param=param, code="context_length_exceeded")
            raise APIError(400, f"{len(ids)} input tokens + {max_new} new tokens exceed the model's "
                           f"{loaded.max_positions} positions", param="max_tokens", code="context_length_exceeded")
        return ids

    def token_lists(value, param: str) -> list[list[int]]:
        """A string, a list of strings, a list of token ids, or a list of those: token id lists."""
        if isinstance(value, str):
            return [loaded.tokenizer.encode(value)]
        if not value:
            raise APIError(400, f"{param} is empty", param=param)
        if all(isinstance(v, int) for v in value):
            value = [value]
        out = [loaded.tokenizer.encode(v) if isinstance(v, str) else list(v) for v in value]
        vocab = int(loaded.model.config.vocab_size)
        if any(not 0 <= t < vocab for ids in out for t in ids):
            raise APIError(400, f"{param} holds token ids outside the vocabulary [0, {vocab})", param=param)
        return out

    def submit(items) -> None:
        try:
            engine.submit(items)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}", code="queue_full") from None
        except EngineStopped as e:
            raise APIError(503, str(e)) from None

    def require(kind: str) -> None:
        if loaded.kind != kind:
            serves = "embeddings" if loaded.kind == EMBED else "completions"
            raise APIError(400, f"the model {loaded.name!r} serves {serves} only", param="model")

    # ---- routes ----
    @app.get("/health")
    async def health():
        if not engine.alive:
            raise APIError(503, "the model engine is not running")
        return {"status": "ok", "model": loaded.name, "kind": loaded.kind}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": loaded.name, "object": "model", "created": 0,
                                            "owned_by": "sparseflow"}]}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        req = await read_body(request, EmbeddingRequest)
        require(EMBED)
        if req.dimensions is not None:
            raise APIError(400, "dimensions is not supported", param="dimensions")
        inputs = [check_tokens(ids) for ids in token_lists(req.input, "input")]
        padded = max(map(len, inputs), default=0) * len(inputs)  # what one forward over them holds
        if padded > limits.max_embedding_batch_tokens:
            raise APIError(413, f"the inputs need {padded} tokens in one batch (longest x count); the limit is "
                           f"{limits.max_embedding_batch_tokens}: send fewer or shorter inputs per request",
                           param="input")
        metrics.prompt_tokens.inc(sum(map(len, inputs)))
        events = _Events(time.monotonic() + limits.request_timeout)
        job = EmbeddingJob(inputs, events.sink(0), events.deadline)
        submit([job])
        try:
            _, event = await events.next()
        finally:
            job.cancel()
        if event[0] == "error":
            raise APIError(event[1], event[2])
        _, vectors, tokens = event
        data = []
        for i, v in enumerate(vectors):
            value = (base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()
                     if req.encoding_format == "base64" else v)
            data.append({"object": "embedding", "index": i, "embedding": value})
        return {"object": "list", "data": data, "model": loaded.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    async def generate(prompts: list[list[int]], req, max_new: int, chat: bool):
        for ids in prompts:
            check_tokens(ids, max_new, "messages" if chat else "prompt")
        metrics.prompt_tokens.inc(sum(map(len, prompts)))
        events = _Events(time.monotonic() + limits.request_timeout)
        sampling = Sampling(max_new_tokens=max_new, temperature=req.temperature, top_p=req.top_p,
                            stop=tuple(req.stop or ()), seed=req.seed)
        seqs = [Sequence(ids, sampling, events.sink(i), events.deadline) for i, ids in enumerate(prompts)]
        submit(seqs)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        base = {"id": ident, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": loaded.name}

        async def events_until_done() -> AsyncIterator[tuple[int, tuple]]:
            open_choices = len(seqs)
            try:
                while open_choices:
                    index, event = await events.next()
                    if event[0] in ("done", "error"):
                        open_choices -= 1
                    yield index, event
            finally:
                for s in seqs:
                    s.cancel()

        if not req.stream:
            texts, reasons, usage = [""] * len(seqs), [None] * len(seqs), _Usage()
            async with contextlib.aclosing(events_until_done()) as stream:
                async for index, event in stream:
                    if event[0] == "error":
                        raise APIError(event[1], event[2])
                    if event[0] == "text":
                        texts[index] += event[1]
                    else:
                        reasons[index] = event[1]
                        usage.add(event[2])
            if chat:
                choices = [{"index": 0, "message": {"role": "assistant", "content": texts[0]}, "logprobs": None,
                            "finish_reason": reasons[0]}]
            else:
                choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                           for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]
            return {**base, "choices": choices, "usage": usage.dict()}

        # Streaming: wait for the first event so an early failure still gets its HTTP status.
        stream = events_until_done()
        first = await stream.__anext__()
        if first[1][0] == "error":
            await stream.aclose()
            raise APIError(first[1][1], first[1][2])
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        chunk_base = {**base, "object": "chat.completion.chunk" if chat else "text_completion"}

        def chunk(index: int, text: str | None, reason: str | None, role: bool = False) -> str:
            if chat:
                delta = ({"role": "assistant", "content": ""} if role else {}) | ({} if text is None else
                                                                                  {"content": text})
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
            return f"data: {json.dumps({**chunk_base, 'choices': [choice]})}\n\n"

        async def sse() -> AsyncIterator[str]:
            usage = _Usage()
            try:
                if chat:
                    yield chunk(0, None, None, role=True)
                pending = [first]
                while True:
                    for index, event in pending:
                        if event[0] == "text":
                            yield chunk(index, event[1], None)
                        elif event[0] == "done":
                            usage.add(event[2])
                            yield chunk(index, None if chat else "", event[1])
                        else:
                            yield f"data: {json.dumps(APIError(event[1], event[2]).body())}\n\n"
                    pending = [await stream.__anext__()]
            except StopAsyncIteration:
                pass
            except APIError as e:
                yield f"data: {json.dumps(e.body())}\n\n"
            finally:
                await stream.aclose()
            if include_usage:
                yield f"data: {json.dumps({**chunk_base, 'choices': [], 'usage': usage.dict()})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await read_body(request, CompletionRequest)
        require(GENERATE)
        max_new = _max_new(req.max_tokens, 16, limits)
        return await generate(token_lists(req.prompt, "prompt"), req, max_new, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await read_body(request, ChatRequest)
        require(GENERATE)
        max_new = _max_new(req.max_completion_tokens or req.max_tokens, limits.max_new_tokens, limits)
        prompt = loaded.tokenizer.chat_prompt([{"role": m.role, "content": m.text()} for m in req.messages])
        return await generate([loaded.tokenizer.encode(prompt)], req, max_new, chat=True)

    KNOWN_PATHS = {r.path for r in app.routes}
    return app


def _max_new(asked: int | None, default: int, limits: Limits) -> int:
    if asked is not None and asked > limits.max_new_tokens:
        raise APIError(400, f"max_tokens is {asked}; this server allows at most {limits.max_new_tokens}",
                       param="max_tokens")
    return min(asked or default, limits.max_new_tokens)


class _Usage:
    def __init__(self):
        self.prompt = self.completion = 0

    def add(self, usage: dict) -> None:
        self.prompt += usage["prompt_tokens"]
        self.completion += usage["completion_tokens"]

    def dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt, "completion_tokens": self.completion,
                "total_tokens": self.prompt + self.completion}
