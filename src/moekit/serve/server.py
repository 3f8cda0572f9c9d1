"""An OpenAI-compatible HTTP server for a moekit model (FastAPI + uvicorn).

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (streaming over
SSE with ``"stream": true``), ``GET /health``, ``GET /metrics`` (JSON: request counters and, when
offloading, the expert cache statistics).

* Sampling: ``max_tokens`` (default 16; chat also ``max_completion_tokens``), ``temperature`` (default
  1.0 as in the OpenAI API; 0 is greedy), ``top_p``, ``stop`` (string or list), ``seed``; ``n`` must be 1.
* Steering: an extra body field ``{"moekit": {"disable": ["3:5"], "force": ["2:1"], "boost": {"3:5": 2.0},
  "bias": {"3:5": 1.5}, "top_k": K, "top_p": P}}`` becomes a ``moekit.routing.RoutingControl`` for that
  request only (``boost`` scales the expert's routing weight, ``bias`` adds to its router logit).
* Chat prompts use the tokenizer's chat template; without one, the documented default
  ``"<|role|>\\ncontent\\n"`` per message followed by ``"<|assistant|>\\n"``.
* One worker thread runs every generation, so requests are served one at a time in arrival order
  and concurrent greedy requests give exactly the sequential results.
* Limits (``create_app`` / ``moekit serve`` flags): the request body is capped at ``max_body_bytes``
  (413 before it is read into memory); a prompt may have at most ``max_prompt_tokens`` tokens (default:
  the model's context), and prompt tokens + ``max_tokens`` must fit the model's context. A text prompt
  longer than ``CHARS_PER_TOKEN`` characters per allowed token is refused before it is tokenized, so a
  huge prompt costs bounded work.
* Invalid requests get HTTP 4xx with ``{"error": {"message", "type": "invalid_request_error", "param",
  "code"}}`` (never a 500 for a malformed value); the connection stays usable and the server keeps serving.
* SIGINT/SIGTERM: generation stops at the next token (a forward pre-hook checks a shutdown flag), the
  requests in flight get an error, and ``serve`` returns normally.

This module holds the app (endpoints, the model thread, streaming). Parsing and validating request
bodies is ``moekit.serve.requests``; the process (socket, uvicorn, signals: ``serve``, ``listen``,
``is_loopback``) is ``moekit.serve.process``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import Request

from moekit.errors import MoekitError
from moekit.models.loading import LoadedModel

# Request parsing and limits live in moekit.serve.requests; the names stay importable from here.
from moekit.serve.requests import (  # noqa: F401  (re-exported)
    CHARS_PER_TOKEN,
    DEFAULT_CHAT_TEMPLATE,
    DEFAULT_MAX_BODY_BYTES,
    MAX_BIAS,
    MAX_JSON_DEPTH,
    MAX_SCALE,
    MAX_SEED,
    MIN_TEMPERATURE,
    Limits,
    RequestError,
    _check_chars,
    _clip,
    _json_type,
    chat_messages,
    chat_prompt,
    check_context,
    check_strings,
    completion_prompt,
    context_length,
    error_body,
    parse_control,
    render_chat,
    sampling_options,
)


class Interrupted(Exception):
    """Raised on the model thread between tokens when the server shuts down or the client went away."""


class ModelWorker:
    """Runs jobs on the model one at a time, in submission order, on its own thread."""

    def __init__(self) -> None:
        self._q: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="moekit-model", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            fn, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:  # noqa: BLE001  (delivered to the waiting request)
                fut.set_exception(exc)

    def submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._q.put((fn, fut))
        return fut

    def close(self) -> None:
        self._q.put(None)
        self.thread.join(timeout=30)


# ----- the app -----------------------------------------------------------------------------------------

def resident_weights(model) -> dict[str, int]:
    """Bytes of the weights the served model holds in memory (parameters and buffers, each storage once; an
    offloaded bank's meta tensors hold none), and of those the packed int4 experts'."""
    from moekit.nn.int4_experts import int4_expert_bytes

    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return {"resident_bytes": sum(seen.values()), "packed_int4_expert_bytes": int4_expert_bytes(model)}


class ServerState:
    """What the endpoints share: the model, its worker, the offload engine (if any), limits, counters."""

    def __init__(self, lm: LoadedModel, engine=None, model_name: str | None = None,
                 limits: Limits | None = None) -> None:
        self.lm = lm
        self.engine = engine
        self.name = model_name or lm.name
        self.limits = limits or Limits(lm)
        self.worker = ModelWorker()
        # prompts are tokenized on their own thread: bounded work that never waits behind a generation
        self.tokenizer_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="moekit-tokenize")
        self.stopping = threading.Event()
        self.cancel: threading.Event | None = None  # the running job's "client went away" flag
        self.started = time.time()
        self.weights = resident_weights(lm.model)
        self.requests = self.errors = self.completed = self.tokens = 0
        self.lock = threading.Lock()

    def count(self, **kw: int) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def check_interrupt(self, module=None, args=None) -> None:
        """Forward pre-hook of the model: stop the job on the model thread between tokens."""
        if threading.current_thread() is not self.worker.thread:
            return
        if self.stopping.is_set():
            raise Interrupted("the server is shutting down")
        if self.cancel is not None and self.cancel.is_set():
            raise Interrupted("the request was cancelled")


def create_app(lm: LoadedModel, engine=None, model_name: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_prompt_tokens: int | None = None):
    """The FastAPI application serving ``lm`` (offloaded through ``engine`` when given), with the request
    body capped at ``max_body_bytes`` and prompts at ``max_prompt_tokens`` (default: the model's context)."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from moekit.generation import GenerationResult, encode_prompt, stream

    limits = Limits(lm, max_body_bytes, max_prompt_tokens)
    state = ServerState(lm, engine, model_name, limits)
    hook = lm.model.register_forward_pre_hook(state.check_interrupt)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        state.stopping.set()
        state.worker.close()
        state.tokenizer_pool.shutdown(wait=False, cancel_futures=True)
        hook.remove()

    app = FastAPI(title="moekit", lifespan=lifespan)
    app.state.moekit = state

    @app.exception_handler(RequestError)
    async def _bad_request(request: Request, exc: RequestError):
        state.count(errors=1)
        return JSONResponse(error_body(str(exc), exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(Interrupted)
    async def _interrupted(request: Request, exc: Interrupted):
        state.count(errors=1)
        return JSONResponse(error_body(str(exc), code="shutting_down", kind="server_error"), status_code=503)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        state.count(errors=1)
        return JSONResponse(error_body(_clip(str(exc.errors()[:1]), 300)), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind=kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        state.count(errors=1)
        return JSONResponse(error_body(f"internal error: {_clip(str(exc), 300)}", kind="server_error"),
                            status_code=500)

    async def read_body(request: Request) -> dict:
        """The JSON object of a POST body, read only up to ``limits.body`` bytes."""
        if not _json_type(request.headers.get("content-type")):
            raise RequestError("the request body must be JSON (Content-Type: application/json)",
                               code="unsupported_media_type", status=415)
        declared = request.headers.get("content-length")
        too_big = f"the request body exceeds this server's limit of {limits.body} bytes"
        if declared is not None and declared.isdigit() and int(declared) > limits.body:
            raise RequestError(too_big, code="request_too_large", status=413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.body:
                raise RequestError(too_big, code="request_too_large", status=413)
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except RecursionError:
            raise RequestError(f"the request body is nested deeper than {MAX_JSON_DEPTH} levels") from None
        except (ValueError, UnicodeDecodeError):
            raise RequestError("the request body is not valid JSON", code="invalid_json") from None
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        check_strings(body)
        return body

    async def prompt_ids(prompt, opts: dict, chat: bool) -> list[int]:
        """Render and tokenize the prompt on the tokenizer thread, then check it against the limits."""
        def work() -> list[int]:
            text = render_chat(lm, prompt) if chat else prompt
            if isinstance(text, list):
                ids = text
            else:
                _check_chars(len(text), limits, "messages" if chat else "prompt")
                try:
                    ids = encode_prompt(lm, text).tolist()
                except MoekitError as exc:
                    raise RequestError(str(exc), param="messages" if chat else "prompt") from None
            check_context(len(ids), opts, limits, param="messages" if chat else "prompt")
            return ids

        return await asyncio.get_running_loop().run_in_executor(state.tokenizer_pool, work)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": state.name}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": state.name, "object": "model", "created": int(state.started),
                                            "owned_by": "moekit"}]}

    @app.get("/metrics")
    async def metrics(belady: bool = False) -> dict:
        cache = None
        if state.engine is not None:
            cache = await asyncio.wrap_future(state.worker.submit(lambda: state.engine.stats(belady=belady)))
        return {"model": state.name, "uptime_s": round(time.time() - state.started, 3),
                "requests": state.requests, "completed": state.completed, "errors": state.errors,
                "completion_tokens": state.tokens, "offload": cache is not None, "cache": cache,
                "weights": state.weights,
                "limits": {"max_body_bytes": limits.body, "max_prompt_tokens": limits.prompt_tokens,
                           "context": limits.context}}

    async def run(body: dict, ids: list[int], opts: dict, chat: bool):
        state.count(requests=1)
        opts = {k: v for k, v in opts.items() if k != "max_name"}
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        want_stream = bool(body.get("stream", False))
        loop = asyncio.get_running_loop()
        if not want_stream:
            def job() -> GenerationResult:
                state.cancel = None
                result = GenerationResult("", [], 0, "length")
                for _ in stream(lm, ids, result=result, **opts):
                    pass
                return result

            try:
                res = await asyncio.wrap_future(state.worker.submit(job))
            except MoekitError as exc:
                raise RequestError(str(exc)) from None
            state.count(completed=1, tokens=len(res.token_ids))
            usage = {"prompt_tokens": res.prompt_tokens, "completion_tokens": len(res.token_ids),
                     "total_tokens": res.prompt_tokens + len(res.token_ids)}
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": res.text},
                          "logprobs": None, "finish_reason": res.finish_reason}
                return {"id": rid, "object": "chat.completion", "created": created, "model": state.name,
                        "choices": [choice], "usage": usage}
            choice = {"index": 0, "text": res.text, "logprobs": None, "finish_reason": res.finish_reason}
            return {"id": rid, "object": "text_completion", "created": created, "model": state.name,
                    "choices": [choice], "usage": usage}

        out: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        done = object()

        def job_stream() -> None:
            state.cancel = cancelled
            result = GenerationResult("", [], 0, "length")
            try:
                for piece in stream(lm, ids, result=result, **opts):
                    if cancelled.is_set():
                        break
                    loop.call_soon_threadsafe(out.put_nowait, ("piece", piece))
                loop.call_soon_threadsafe(out.put_nowait, ("end", result))
            except Exception as exc:  # noqa: BLE001  (becomes an error event of the stream)
                loop.call_soon_threadsafe(out.put_nowait, ("error", exc))
            finally:
                state.cancel = None
                loop.call_soon_threadsafe(out.put_nowait, (done, None))

        def chunk(piece: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                delta = {} if piece is None else ({"role": "assistant", "content": piece} if first
                                                  else {"content": piece})
                c = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.name,
                       "choices": [c]}
            else:
                c = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
                obj = {"id": rid, "object": "text_completion", "created": created, "model": state.name,
                       "choices": [c]}
            return f"data: {json.dumps(obj)}\n\n"

        async def events():
            state.worker.submit(job_stream)
            first = True
            try:
                if chat:
                    yield chunk("", None, first=True)
                    first = False
                while True:
                    kind, val = await out.get()
                    if kind is done:
                        break
                    if kind == "piece":
                        yield chunk(val, None, first=first)
                        first = False
                    elif kind == "end":
                        state.count(completed=1, tokens=len(val.token_ids))
                        yield chunk(None, val.finish_reason)
                    else:
                        state.count(errors=1)
                        code = "shutting_down" if isinstance(val, Interrupted) else None
                        err = error_body(_clip(str(val), 300), code=code, kind="server_error")
                        yield f"data: {json.dumps(err)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                cancelled.set()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        prompt = completion_prompt(lm, body, limits)
        opts = sampling_options(lm, body, chat=False, limits=limits)
        ids = await prompt_ids(prompt, opts, chat=False)
        return await run(body, ids, opts, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        messages = chat_messages(lm, body, limits)
        opts = sampling_options(lm, body, chat=True, limits=limits)
        ids = await prompt_ids(messages, opts, chat=True)
        return await run(body, ids, opts, chat=True)

    return app


def __getattr__(name: str):
    """``serve``, ``listen`` and ``is_loopback`` moved to ``moekit.serve.process``; still importable from here."""
    if name in ("serve", "listen", "is_loopback"):
        from moekit.serve import process

        return getattr(process, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
