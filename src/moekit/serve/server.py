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
* Invalid requests get HTTP 400 with ``{"error": {"message", "type": "invalid_request_error", "param",
  "code"}}``; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import queue
import signal
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import Request

from moekit.errors import MoekitError
from moekit.models.loading import LoadedModel

DEFAULT_CHAT_TEMPLATE = "<|{role}|>\n{content}\n"


class RequestError(Exception):
    """A client mistake: becomes a 400 with an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


def error_body(message: str, param: str | None = None, code: str | None = None,
               kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ModelWorker:
    """Runs jobs on the model one at a time, in submission order, on its own thread."""

    def __init__(self) -> None:
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="moekit-model", daemon=True)
        self._thread.start()

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
        self._thread.join(timeout=30)


# ----- request parsing ---------------------------------------------------------------------------------

def _number(body: dict, name: str, default, kind: type, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        raise RequestError(f"'{name}' must be {'an integer' if kind is int else 'a number'}", param=name)
    v = kind(v)
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise RequestError(f"'{name}' must be {'>' if lo_open else '>='} {lo}", param=name)
    if hi is not None and v > hi:
        raise RequestError(f"'{name}' must be <= {hi}", param=name)
    return v


def _expert(item: Any, param: str) -> tuple[int, int]:
    try:
        if isinstance(item, str):
            layer, expert = item.split(":")
            return int(layer), int(expert)
        if isinstance(item, (list, tuple)) and len(item) == 2:
            return int(item[0]), int(item[1])
    except (ValueError, TypeError):
        pass
    raise RequestError(f"bad expert {item!r} in '{param}': write \"LAYER:EXPERT\", e.g. \"3:5\"", param=param)


def parse_control(lm: LoadedModel, spec: Any):
    """The ``moekit`` body field → a validated RoutingControl (or None)."""
    from moekit.routing import RoutingControl

    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise RequestError("'moekit' must be an object", param="moekit")
    unknown = set(spec) - {"disable", "force", "boost", "scale", "bias", "top_k", "top_p"}
    if unknown:
        raise RequestError(f"unknown fields in 'moekit': {sorted(unknown)}", param="moekit")

    def experts(name: str) -> list[tuple[int, int]]:
        v = spec.get(name) or []
        if not isinstance(v, list):
            raise RequestError(f"'moekit.{name}' must be a list of \"LAYER:EXPERT\"", param=f"moekit.{name}")
        return [_expert(x, f"moekit.{name}") for x in v]

    def values(name: str) -> dict[tuple[int, int], float]:
        v = spec.get(name) or {}
        if not isinstance(v, dict):
            raise RequestError(f"'moekit.{name}' must be an object {{\"LAYER:EXPERT\": number}}",
                               param=f"moekit.{name}")
        out = {}
        for key, val in v.items():
            if isinstance(val, bool) or not isinstance(val, (int, float)):
                raise RequestError(f"'moekit.{name}' values must be numbers", param=f"moekit.{name}")
            out[_expert(key, f"moekit.{name}")] = float(val)
        return out

    scale = {**values("scale"), **values("boost")}
    top_k = _number(spec, "top_k", None, int, lo=1)
    top_p = _number(spec, "top_p", None, float, lo=0.0, hi=1.0, lo_open=True)
    ctrl = RoutingControl.make(experts("disable"), experts("force"), scale, values("bias"), top_k, top_p)
    try:
        ctrl.validate(lm.moe)
    except MoekitError as exc:
        raise RequestError(str(exc), param="moekit") from None
    return None if ctrl.is_empty() else ctrl


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        return stop
    raise RequestError("'stop' must be a string or a list of up to 4 strings", param="stop")


def sampling_options(lm: LoadedModel, body: dict, chat: bool) -> dict[str, Any]:
    """Generation options of a completions / chat request (validated)."""
    if _number(body, "n", 1, int, lo=1) != 1:
        raise RequestError("only n=1 is supported", param="n")
    max_name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_new = _number(body, max_name, 16, int, lo=1, hi=int(getattr(lm.config, "max_position_embeddings", 4096)))
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError("'seed' must be an integer", param="seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be a boolean", param="stream")
    return {
        "max_new_tokens": max_new,
        "temperature": _number(body, "temperature", 1.0, float, lo=0.0, hi=2.0),
        "top_p": _number(body, "top_p", 1.0, float, lo=0.0, hi=1.0, lo_open=True),
        "seed": seed, "stop": _stop(body), "control": parse_control(lm, body.get("moekit")),
    }


def completion_prompt(lm: LoadedModel, body: dict):
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("'prompt' is empty", param="prompt")
        if lm.tokenizer is None:
            raise RequestError("this model has no tokenizer: send 'prompt' as a list of token ids", param="prompt")
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        vocab = int(lm.config.vocab_size)
        if any(t < 0 or t >= vocab for t in prompt):
            raise RequestError(f"token ids must be in [0, {vocab})", param="prompt")
        return prompt
    raise RequestError("'prompt' must be a non-empty string or a list of token ids (one prompt)", param="prompt")


def chat_prompt(lm: LoadedModel, body: dict) -> str:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with 'role' and 'content'", param="messages")
        content = m.get("content", "")
        if isinstance(content, list):  # [{"type": "text", "text": ...}]
            try:
                content = "".join(part["text"] for part in content if part.get("type") == "text")
            except (TypeError, KeyError, AttributeError):
                raise RequestError(f"messages[{i}].content parts must be text", param="messages") from None
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string", param="messages")
        clean.append({"role": m["role"], "content": content})
    if lm.tokenizer is None:
        raise RequestError("this model has no tokenizer, so chat is unavailable", param="messages")
    if getattr(lm.tokenizer, "chat_template", None):
        return lm.tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=True)
    return "".join(DEFAULT_CHAT_TEMPLATE.format(**m) for m in clean) + "<|assistant|>\n"


# ----- the app -----------------------------------------------------------------------------------------

class ServerState:
    """What the endpoints share: the model, its worker, the offload engine (if any), counters."""

    def __init__(self, lm: LoadedModel, engine=None, model_name: str | None = None) -> None:
        self.lm = lm
        self.engine = engine
        self.name = model_name or lm.name
        self.worker = ModelWorker()
        self.started = time.time()
        self.requests = self.errors = self.completed = self.tokens = 0
        self.lock = threading.Lock()

    def count(self, **kw: int) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)


def create_app(lm: LoadedModel, engine=None, model_name: str | None = None):
    """The FastAPI application serving ``lm`` (offloaded through ``engine`` when given)."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from moekit.generation import GenerationResult, stream

    state = ServerState(lm, engine, model_name)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        state.worker.close()

    app = FastAPI(title="moekit", lifespan=lifespan)
    app.state.moekit = state

    @app.exception_handler(RequestError)
    async def _bad_request(request: Request, exc: RequestError):
        state.count(errors=1)
        return JSONResponse(error_body(str(exc), exc.param, exc.code), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        state.count(errors=1)
        return JSONResponse(error_body(str(exc.errors()[:1])), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind=kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        state.count(errors=1)
        return JSONResponse(error_body(f"internal error: {exc}", kind="server_error"), status_code=500)

    async def read_body(request: Request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise RequestError("the request body is not valid JSON", code="invalid_json") from None
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        return body

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
                "completion_tokens": state.tokens, "offload": cache is not None, "cache": cache}

    async def run(body: dict, prompt, opts: dict, chat: bool):
        state.count(requests=1)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        want_stream = bool(body.get("stream", False))
        loop = asyncio.get_running_loop()
        if not want_stream:
            def job() -> GenerationResult:
                result = GenerationResult("", [], 0, "length")
                for _ in stream(lm, prompt, result=result, **opts):
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
            result = GenerationResult("", [], 0, "length")
            try:
                for piece in stream(lm, prompt, result=result, **opts):
                    if cancelled.is_set():
                        break
                    loop.call_soon_threadsafe(out.put_nowait, ("piece", piece))
                loop.call_soon_threadsafe(out.put_nowait, ("end", result))
            except Exception as exc:  # noqa: BLE001
                loop.call_soon_threadsafe(out.put_nowait, ("error", exc))
            finally:
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
                        err = error_body(str(val), kind="server_error")
                        yield f"data: {json.dumps(err)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                cancelled.set()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        prompt = completion_prompt(lm, body)
        opts = sampling_options(lm, body, chat=False)
        return await run(body, prompt, opts, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        prompt = chat_prompt(lm, body)
        opts = sampling_options(lm, body, chat=True)
        return await run(body, prompt, opts, chat=True)

    return app


def serve(lm: LoadedModel, host: str = "127.0.0.1", port: int = 8000, engine=None, log_level: str = "warning",
          model_name: str | None = None, on_ready: Callable[[], None] | None = None) -> None:
    """Serve ``lm`` until SIGINT/SIGTERM, then shut down cleanly (returns normally)."""
    import uvicorn

    app = create_app(lm, engine=engine, model_name=model_name)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=5)
    server = _Server(config)
    server.on_ready = on_ready
    server.run()


def _make_server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, but a SIGINT/SIGTERM ends ``run`` normally (uvicorn re-raises the signal)."""

        on_ready: Callable[[], None] | None = None

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            sigs = (signal.SIGINT, signal.SIGTERM)
            previous = {s: signal.signal(s, self._on_signal) for s in sigs}
            try:
                yield
            finally:
                for s, h in previous.items():
                    signal.signal(s, h)

        def _on_signal(self, sig, frame) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.on_ready is not None and self.started:
                self.on_ready()

    return Server


class _ServerProxy:
    def __call__(self, config):
        return _make_server_class()(config)


_Server = _ServerProxy()
