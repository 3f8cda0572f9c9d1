"""Text generation with routing interventions, sampling and streaming (used by the CLI and the server).

A *decoder* produces next-token logits: ``prefill(ids)`` then ``step(token)``. The plain decoder runs the
model with a KV cache; other strategies (self-contrast decoding, test-time rerouting) are picked by name
from ``DECODERS``. Those live in ``moekit.steer`` (a feature layer above this one): they are registered
here as lazy ``"module:attr"`` entries with their help, and imported on first use — no import side effect,
no import of ``moekit.steer`` from this module. Routing controls apply to every forward through
``moekit.route``; sampling, stop strings and streaming are shared by all decoders.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from moekit.errors import MoekitError
from moekit.models.compat import cache_kwargs, output_cache
from moekit.models.loading import LoadedModel
from moekit.registry import Registry
from moekit.routing import RoutingControl, route

STATIC_CHUNK = 256
"""A static KV cache holds twice the prompt, at least this many positions more (at most the tokens still to come),
and doubles when full."""


class Decoder:
    """Plain KV-cached decoding of ``lm.model``. Where moekit's whole-layer decode step runs (``use_fast_decode``),
    the cache is static (written in place by the native step) and grows by doubling; else transformers' dynamic
    cache. ``reserve``: how many tokens will follow the prompt at most (``stream`` sets it), which caps the cache."""

    def __init__(self, lm: LoadedModel, **options) -> None:
        if options:
            raise MoekitError(f"unexpected decoder options: {sorted(options)}")
        self.lm = lm
        self.cache = None
        self.reserve: int | None = None
        self._limit: int | None = None  # the cache's largest useful length: prompt + reserve
        self._static = False

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.view(1, -1).to(self.lm.device)
        n = ids.shape[1]
        self._limit = n + self.reserve if self.reserve is not None else None
        cache = static_cache(self.lm.model, _capacity(n, self._limit))
        self._static = cache is not None
        kwargs = cache_kwargs(self.lm.model, cache) if cache is not None else {}
        out = self.lm.model(input_ids=ids, use_cache=True, **kwargs)
        self.cache = output_cache(out)
        return out.logits[0, -1].float()

    @torch.no_grad()
    def step(self, token: int) -> torch.Tensor:
        if self._static:
            self.cache = _room_for_one(self.lm.model, self.cache, self._limit)
        ids = torch.tensor([[token]], device=self.lm.device)
        out = self.lm.model(input_ids=ids, **cache_kwargs(self.lm.model, self.cache), use_cache=True)
        self.cache = output_cache(out)
        return out.logits[0, -1].float()


def _capacity(used: int, limit: int | None) -> int:
    """A static cache's length once ``used`` positions are filled (the prompt, or a full cache): twice that, at least
    ``STATIC_CHUNK`` more, at most ``limit`` but never without room for one more token."""
    size = max(2 * used, used + STATIC_CHUNK)
    return max(used + 1, min(size, limit)) if limit is not None else size


def static_cache(model: torch.nn.Module, length: int):
    """An empty static KV cache of ``length`` positions for ``model``, or None where a dynamic one serves better: the
    model does not run moekit's whole-layer decode step, or some layer would not be a plain static layer (sliding
    window, linear attention: those cannot grow by copying)."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    from moekit.nn.fused_decode import runs_whole_layers

    if not runs_whole_layers(model):
        return None
    try:
        cache = StaticCache(config=model.config, max_cache_len=length)
    except (TypeError, ValueError, AttributeError):
        return None
    return cache if all(type(layer) is StaticLayer for layer in cache.layers) else None


def _room_for_one(model: torch.nn.Module, cache, limit: int | None):
    """The static ``cache``, or when it is full a longer copy (``_capacity``): the filled positions and the length
    copied layer by layer, each of ``cache``'s layers freed once copied (``cache`` is not usable afterwards)."""
    from transformers import StaticCache

    used, length = int(cache.get_seq_length()), cache.layers[0].max_cache_len
    if used < length:
        return cache
    grown = StaticCache(config=model.config, max_cache_len=_capacity(used, limit))
    for old, new in zip(cache.layers, grown.layers, strict=True):
        if old.is_initialized:
            new.lazy_initialization(old.keys, old.values)
            new.keys[:, :, :used].copy_(old.keys[:, :, :used])
            new.values[:, :, :used].copy_(old.values[:, :, :used])
            new.cumulative_length.fill_(int(old.cumulative_length))
            # the old cache is dropped on return: free each layer once copied, so that the copy's peak is about
            # the new cache plus one old layer (the dynamic cache's append peaks at twice the cache every step)
            old.keys = old.values = None
    return grown


DECODERS: Registry[Callable[..., Decoder]] = Registry("decoding strategy")
DECODERS.add("plain", Decoder, help="the model's own next-token logits, KV-cached")
DECODERS.register_lazy("contrast", "moekit.steer.contrast:ContrastDecoder",
                       help="Self-contrast decoding (SCMoE): the model's routing against a weaker top-k routing")
DECODERS.register_lazy("rewire", "moekit.steer.rewire:RewireDecoder",
                       help="Test-time rerouting: adapt router-logit biases on the context")


@dataclass
class GenerationResult:
    """What ``generate`` returns: the new text and tokens and why generation stopped."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (eos or a stop string) or "length"
    stats: dict = field(default_factory=dict)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    """Greedy when ``temperature`` is 0; else temperature + nucleus (top-p) sampling."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = (sorted_p.cumsum(0) - sorted_p) < top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))


def encode_prompt(lm: LoadedModel, prompt: str | Sequence[int]) -> torch.Tensor:
    """Token ids of ``prompt`` (a string needs the model's tokenizer)."""
    if isinstance(prompt, str):
        if lm.tokenizer is None:
            raise MoekitError(f"{lm.name} has no tokenizer; pass token ids instead of text")
        ids = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    else:
        ids = list(prompt)
    if not ids:
        raise MoekitError("the prompt is empty")
    return torch.tensor(ids, dtype=torch.long)


def _eos_ids(lm: LoadedModel) -> set[int]:
    eos = getattr(lm.model.generation_config, "eos_token_id", None) or getattr(lm.config, "eos_token_id", None)
    if eos is None and lm.tokenizer is not None:
        eos = lm.tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}


def stream(
    lm: LoadedModel,
    prompt: str | Sequence[int],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    control: RoutingControl | None = None,
    strategy: str = "plain",
    strategy_options: dict | None = None,
    result: GenerationResult | None = None,
) -> Iterator[str]:
    """Yield the generated text piece by piece; fills ``result`` (if given) when done."""
    if max_new_tokens < 1:
        raise MoekitError("max_new_tokens must be at least 1")
    if temperature < 0 or not 0 < top_p <= 1:
        raise MoekitError("temperature must be >= 0 and top_p in (0, 1]")
    ids = encode_prompt(lm, prompt)
    decoder = DECODERS.get(strategy)(lm, **(strategy_options or {}))
    decoder.reserve = max_new_tokens
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    eos = _eos_ids(lm)
    out: list[int] = []
    text, reason = "", "length"
    ctx = route(lm, control=control) if control is not None and not control.is_empty() else contextlib.nullcontext()
    hold = max((len(s) for s in stop if s), default=1) - 1  # a stop string may still be completing
    full = ""
    with ctx:
        logits = decoder.prefill(ids)
        for i in range(max_new_tokens):
            token = sample_next(logits, temperature, top_p, gen)
            if token in eos:
                reason = "stop"
                break
            out.append(token)
            full = lm.tokenizer.decode(out) if lm.tokenizer is not None else " ".join(map(str, out))
            hit = min((full.index(s) for s in stop if s and s in full), default=None)
            if hit is not None:
                full, reason = full[:hit], "stop"
                break
            safe = len(full) - hold
            if not full.endswith("\ufffd") and safe > len(text):  # whole characters, no partial stop string
                yield full[len(text):safe]
                text = full[:safe]
            if i + 1 < max_new_tokens:
                logits = decoder.step(token)
    if len(full) > len(text) and not full.endswith("\ufffd"):
        yield full[len(text):]
    text = full if not full.endswith("\ufffd") else text
    if result is not None:
        result.text, result.token_ids, result.prompt_tokens, result.finish_reason = text, out, len(ids), reason
        result.stats = getattr(decoder, "stats", {})


def generate(lm: LoadedModel, prompt: str | Sequence[int], **options) -> GenerationResult:
    """Generate a completion of ``prompt``; options as in ``stream`` (max_new_tokens, temperature, top_p,
    seed, stop, control, strategy, strategy_options)."""
    result = GenerationResult("", [], 0, "length")
    for _ in stream(lm, prompt, result=result, **options):
        pass
    return result
