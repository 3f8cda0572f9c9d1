"""Requests to ``moekit serve``: parsing and validating the OpenAI request bodies, the server's limits.

Everything here is pure (no HTTP, no threads): a bad value raises ``RequestError``, which the app
(``moekit.serve.server``) turns into a 4xx with an OpenAI-style error body.  The steering field
``{"moekit": {...}}`` becomes a ``RoutingControl``; prompts are checked against the character, token and
context caps of ``Limits`` before any generation starts.
"""

from __future__ import annotations

import math
import re
from typing import Any

from moekit.errors import MoekitError
from moekit.experts import ExpertRef
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


def error_body(message: str, param: str | None = None, code: str | None = None,
               kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}



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


def _expert(item: Any, param: str) -> ExpertRef:
    """One expert of the ``moekit`` field: "LAYER:EXPERT" (or, legacy, a [layer, expert] pair)."""
    try:
        return ExpertRef.coerce(item, f"expert in '{param}'")
    except MoekitError as exc:
        raise RequestError(str(exc), param=param) from None


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

    def experts(name: str) -> list[ExpertRef]:
        v = spec.get(name) or []
        if not isinstance(v, list):
            raise RequestError(f"'moekit.{name}' must be a list of \"LAYER:EXPERT\"", param=f"moekit.{name}")
        return [_expert(x, f"moekit.{name}") for x in v]

    def values(name: str, bound: float) -> dict[ExpertRef, float]:
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


def _json_type(content_type: str | None) -> bool:
    if not content_type:
        return True
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))
