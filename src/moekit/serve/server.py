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
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import ipaddress
import json
import math
import queue
import re
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import Request

from moekit.errors import MoekitError
from moekit.models.loading import LoadedModel

DEFAULT_CHAT_TEMPLATE = "<|{role}|>\n{content}\n"
DEFAULT_MAX_BODY_BYTES = 1 << 20
# A text prompt longer than this many characters per allowed prompt token is refused before tokenizing
# (real tokenizers average 2-5 characters per token; the margin keeps every legitimate prompt).
CHARS_PER_TOKEN = 16
MAX_JSON_DEPTH = 32
# Temperatures in (0, MIN_TEMPERATURE) sample as greedy: logits / t would overflow to inf.
MIN_TEMPERATURE = 1e-5
MAX_SEED = 2**63 - 1
MAX_SCALE, MAX_BIAS = 100.0, 1e4
_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


class RequestError(Exception):
    """A client mistake: becomes a 4xx (400 unless ``status`` says otherwise) with an OpenAI-style body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


class Interrupted(Exception):
    """Raised on the model thread between tokens when the server shuts down or the client went away."""


def error_body(message: str, param: str | None = None, code: str | None = None,
               kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


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


# ----- request parsing ---------------------------------------------------------------------------------

def _short(value: Any, limit: int = 60) -> str:
    """A bounded repr for error messages (values come from the client and may be huge)."""
    text = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _clip(text: str, limit: int = 300) -> str:
    """``text`` cut to ``limit`` characters (messages of exceptions that may quote client input)."""
    return text if len(text) <= limit else text[:limit] + "..."


def _number(body: dict, name: str, default, kind: type, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False, param: str | None = None):
    """``body[name]`` as a finite ``kind`` within [lo, hi] (``(lo, hi]`` with ``lo_open``), else a 400."""
    param = param or name
    v = body.get(name, default)
    if v is None:
        return default
    what = "an integer" if kind is int else "a number"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RequestError(f"'{param}' must be {what}, not {_short(v)}", param=param)
    if isinstance(v, float) and not math.isfinite(v):
        raise RequestError(f"'{param}' must be a finite number, not {v}", param=param)
    if kind is int and isinstance(v, float):
        if not v.is_integer():
            raise RequestError(f"'{param}' must be an integer, not {v}", param=param)
        v = int(v)
    # compare before converting: float(10**400) would overflow
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise RequestError(f"'{param}' must be {'>' if lo_open else '>='} {lo}, not {_short(v)}", param=param)
    if hi is not None and v > hi:
        raise RequestError(f"'{param}' must be <= {hi}, not {_short(v)}", param=param)
    try:
        return kind(v)
    except OverflowError:
        raise RequestError(f"'{param}' is out of range", param=param) from None


def _index(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError
    if isinstance(v, int):
        return v
    if isinstance(v, str) and v.strip().lstrip("-").isdigit() and len(v) <= 12:
        return int(v)
    raise ValueError


def _expert(item: Any, param: str) -> tuple[int, int]:
    try:
        if isinstance(item, str) and item.count(":") == 1:
            layer, expert = item.split(":")
            return _index(layer), _index(expert)
        if isinstance(item, list) and len(item) == 2:
            return _index(item[0]), _index(item[1])
    except ValueError:
        pass
    raise RequestError(f"bad expert {_short(item)} in '{param}': write \"LAYER:EXPERT\", e.g. \"3:5\"", param=param)


def parse_control(lm: LoadedModel, spec: Any):
    """The ``moekit`` body field → a validated RoutingControl (or None)."""
    from moekit.routing import RoutingControl

    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise RequestError("'moekit' must be an object", param="moekit")
    unknown = set(spec) - {"disable", "force", "boost", "scale", "bias", "top_k", "top_p"}
    if unknown:
        raise RequestError(f"unknown fields in 'moekit': {_short(sorted(unknown))}", param="moekit")

    def experts(name: str) -> list[tuple[int, int]]:
        v = spec.get(name) or []
        if not isinstance(v, list):
            raise RequestError(f"'moekit.{name}' must be a list of \"LAYER:EXPERT\"", param=f"moekit.{name}")
        return [_expert(x, f"moekit.{name}") for x in v]

    def values(name: str, bound: float) -> dict[tuple[int, int], float]:
        v = spec.get(name) or {}
        if not isinstance(v, dict):
            raise RequestError(f"'moekit.{name}' must be an object {{\"LAYER:EXPERT\": number}}",
                               param=f"moekit.{name}")
        out = {}
        for key, val in v.items():
            if val is None:
                raise RequestError(f"'moekit.{name}' values must be numbers", param=f"moekit.{name}")
            out[_expert(key, f"moekit.{name}")] = _number(v, key, None, float, lo=-bound, hi=bound,
                                                          param=f"moekit.{name}")
        return out

    scale = {**values("scale", MAX_SCALE), **values("boost", MAX_SCALE)}
    top_k = _number(spec, "top_k", None, int, lo=1, param="moekit.top_k")
    top_p = _number(spec, "top_p", None, float, lo=0.0, hi=1.0, lo_open=True, param="moekit.top_p")
    ctrl = RoutingControl.make(experts("disable"), experts("force"), scale, values("bias", MAX_BIAS), top_k, top_p)
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


def context_length(config: Any) -> int | None:
    """The model's context in tokens (``max_position_embeddings`` or the config's equivalent), if declared."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in _CONTEXT_KEYS:
        v = getattr(text, key, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


class Limits:
    """The server's caps: request body bytes, prompt tokens, the model's context (None: undeclared)."""

    def __init__(self, lm: LoadedModel, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 max_prompt_tokens: int | None = None) -> None:
        if max_body_bytes < 1:
            raise MoekitError(f"max_body_bytes must be at least 1, not {max_body_bytes}")
        if max_prompt_tokens is not None and max_prompt_tokens < 1:
            raise MoekitError(f"max_prompt_tokens must be at least 1, not {max_prompt_tokens}")
        self.body = max_body_bytes
        self.context = context_length(lm.config)
        caps = [c for c in (max_prompt_tokens, self.context) if c is not None]
        self.prompt_tokens = min(caps) if caps else 4096
        self.prompt_chars = CHARS_PER_TOKEN * self.prompt_tokens
        self.max_new = self.context or 4096


def check_strings(body: Any) -> None:
    """Refuse JSON nested deeper than MAX_JSON_DEPTH and strings with lone surrogates (iteratively)."""
    todo = [(body, 1)]
    while todo:
        node, depth = todo.pop()
        if isinstance(node, str):
            if _SURROGATE.search(node):
                raise RequestError("the request contains a lone surrogate (e.g. \\ud800): not valid Unicode",
                                   code="invalid_unicode")
            continue
        if not isinstance(node, (dict, list)):
            continue
        if depth > MAX_JSON_DEPTH:
            raise RequestError(f"the request body is nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(node, dict):
            todo.extend((k, depth) for k in node)
            todo.extend((v, depth + 1) for v in node.values())
        else:
            todo.extend((v, depth + 1) for v in node)


def sampling_options(lm: LoadedModel, body: dict, chat: bool, limits: Limits | None = None) -> dict[str, Any]:
    """Generation options of a completions / chat request (validated)."""
    limits = limits or Limits(lm)
    if _number(body, "n", 1, int, lo=1) != 1:
        raise RequestError("only n=1 is supported", param="n")
    max_name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_new = _number(body, max_name, None, int, lo=1, hi=limits.max_new)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(f"'seed' must be an integer, not {_short(seed)}", param="seed")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise RequestError(f"'seed' must be in [0, 2**63 - 1], not {_short(seed)}", param="seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be a boolean", param="stream")
    temperature = _number(body, "temperature", 1.0, float, lo=0.0, hi=2.0)
    return {
        "max_new_tokens": max_new, "max_name": max_name,
        "temperature": 0.0 if temperature < MIN_TEMPERATURE else temperature,
        "top_p": _number(body, "top_p", 1.0, float, lo=0.0, hi=1.0, lo_open=True),
        "seed": seed, "stop": _stop(body), "control": parse_control(lm, body.get("moekit")),
    }


def completion_prompt(lm: LoadedModel, body: dict, limits: Limits | None = None):
    """The prompt of a completions request: a string or a list of token ids, within the size caps."""
    limits = limits or Limits(lm)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("'prompt' is empty", param="prompt")
        if lm.tokenizer is None:
            raise RequestError("this model has no tokenizer: send 'prompt' as a list of token ids", param="prompt")
        _check_chars(len(prompt), limits, "prompt")
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        _check_prompt_tokens(len(prompt), limits)
        vocab = int(lm.config.vocab_size)
        if any(t < 0 or t >= vocab for t in prompt):
            raise RequestError(f"token ids must be in [0, {vocab})", param="prompt")
        return prompt
    raise RequestError("'prompt' must be a non-empty string or a list of token ids (one prompt)", param="prompt")


def _check_chars(n: int, limits: Limits, param: str) -> None:
    if n > limits.prompt_chars:
        raise RequestError(f"the prompt has {n} characters, more than this server accepts ({limits.prompt_chars}: "
                           f"{CHARS_PER_TOKEN} per token of the {limits.prompt_tokens}-token prompt limit)",
                           param=param, code="context_length_exceeded")


def _check_prompt_tokens(n: int, limits: Limits) -> None:
    if n > limits.prompt_tokens:
        raise RequestError(f"the prompt has {n} tokens, more than this server's limit of {limits.prompt_tokens}",
                           param="prompt", code="context_length_exceeded")


def check_context(n_prompt: int, opts: dict, limits: Limits, param: str = "prompt") -> None:
    """Prompt tokens within the prompt cap, and prompt + max_tokens within the context; fills the default
    ``max_new_tokens`` (16, or what is left of the context)."""
    _check_prompt_tokens(n_prompt, limits)
    if opts["max_new_tokens"] is None:
        room = (limits.context - n_prompt) if limits.context is not None else 16
        if room < 1:
            raise RequestError(f"the prompt has {n_prompt} tokens, which fills the model's context of "
                               f"{limits.context} tokens", param=param, code="context_length_exceeded")
        opts["max_new_tokens"] = min(16, room)
    elif limits.context is not None and n_prompt + opts["max_new_tokens"] > limits.context:
        name = opts["max_name"]
        raise RequestError(f"the prompt has {n_prompt} tokens and {name} is {opts['max_new_tokens']}: "
                           f"{n_prompt + opts['max_new_tokens']} tokens exceed the model's context of "
                           f"{limits.context}", param=name, code="context_length_exceeded")


def chat_messages(lm: LoadedModel, body: dict, limits: Limits | None = None) -> list[dict]:
    """The ``messages`` of a chat request, validated and within the character cap."""
    limits = limits or Limits(lm)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    clean, chars = [], 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with 'role' and 'content'", param="messages")
        content = m.get("content", "")
        if content is None:
            content = ""
        if isinstance(content, list):  # [{"type": "text", "text": ...}]
            if not all(isinstance(p, dict) and isinstance(p.get("text", ""), str) for p in content):
                raise RequestError(f"messages[{i}].content parts must be text", param="messages")
            content = "".join(p.get("text", "") for p in content if p.get("type") == "text")
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string", param="messages")
        chars += len(content) + len(m["role"])
        _check_chars(chars, limits, "messages")
        clean.append({"role": m["role"], "content": content})
    if lm.tokenizer is None:
        raise RequestError("this model has no tokenizer, so chat is unavailable", param="messages")
    return clean


def render_chat(lm: LoadedModel, messages: list[dict]) -> str:
    """The chat prompt: the tokenizer's chat template, or the documented default."""
    if getattr(lm.tokenizer, "chat_template", None):
        try:
            return lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001  (a template may reject any message sequence)
            raise RequestError(f"the chat template rejected the messages: {_clip(str(exc), 200)}",
                               param="messages") from None
    return "".join(DEFAULT_CHAT_TEMPLATE.format(**m) for m in messages) + "<|assistant|>\n"


def chat_prompt(lm: LoadedModel, body: dict) -> str:
    """The rendered prompt of a chat request."""
    return render_chat(lm, chat_messages(lm, body))


# ----- the app -----------------------------------------------------------------------------------------

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


def _json_type(content_type: str | None) -> bool:
    if not content_type:
        return True
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


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


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``; a one-line MoekitError when the port is invalid or in use."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise MoekitError(f"--port must be in 0..65535, not {port}")
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise MoekitError(f"cannot listen on {host}: {exc}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        reason = "the port is already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise MoekitError(f"cannot listen on {host}:{port}: {reason}") from None
    sock.set_inheritable(True)
    return sock


def serve(lm: LoadedModel, host: str = "127.0.0.1", port: int = 8000, engine=None, log_level: str = "warning",
          model_name: str | None = None, on_ready: Callable[[], None] | None = None,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_prompt_tokens: int | None = None,
          sock: socket.socket | None = None) -> None:
    """Serve ``lm`` until SIGINT/SIGTERM, then shut down cleanly (returns normally). ``sock``: an already
    listening socket (see ``listen``); without it, ``host:port`` is bound here."""
    import uvicorn

    sock = sock or listen(host, port)
    app = create_app(lm, engine=engine, model_name=model_name, max_body_bytes=max_body_bytes,
                     max_prompt_tokens=max_prompt_tokens)
    config = uvicorn.Config(app, host=host, port=sock.getsockname()[1], log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=5)
    server = _Server(config)
    server.on_ready = on_ready
    server.on_stop = app.state.moekit.stopping.set
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


def _make_server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, but a SIGINT/SIGTERM ends ``run`` normally (uvicorn re-raises the signal) and
        first tells the model thread to stop between tokens (``on_stop``)."""

        on_ready: Callable[[], None] | None = None
        on_stop: Callable[[], None] | None = None

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
            if self.on_stop is not None:
                self.on_stop()

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.on_ready is not None and self.started:
                self.on_ready()

    return Server


class _ServerProxy:
    def __call__(self, config):
        return _make_server_class()(config)


_Server = _ServerProxy()
