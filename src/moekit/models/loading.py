"""Load a model by hub id, local directory or bundled name, with its tokenizer and MoEMap.

The model's structure without weights (meta device) and reading weights tensor by tensor from a checkpoint
live in ``moekit.models.structure``; their names are importable from here too."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moekit.errors import MoekitError
from moekit.formats.checkpoint import checkpoint_dtype
from moekit.formats.quantized import QUANT_CONFIG
from moekit.formats.tokenizer import load_tokenizer_from
from moekit.models.moe_map import MoEMap, build_moe_map
from moekit.models.quantized import is_quantized_checkpoint, load_quantized

BUNDLED_PREFIX = "moekit:"
DEFAULT_MODEL = "moekit:tiny"
DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class LoadedModel:
    """A model ready for moekit: the HF model (eval mode), its tokenizer (or None) and its MoEMap."""

    model: nn.Module
    tokenizer: object | None
    moe: MoEMap
    name: str
    path: Path | None = None
    #: the expert engine serving this model's experts when they are not resident (``moekit.load(max_memory=)``)
    engine: object | None = None
    #: bytes of the memory budget set aside for activations (``moekit.load(max_memory=)``); None: no budget
    activation_bytes: int | None = None

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def activation_bytes_per_token(lm: LoadedModel, seq_len: int) -> int:
    """Estimated peak activation bytes per token of one forward (no logits beyond one window's): the routed
    experts' gathered inputs, intermediates and outputs (k per token, in several dtypes), the hidden states and
    the attention scores. Calibrated on a 640 MB OLMoE-shaped model (~140 kB per token, measured) — an estimate
    for sizing batches under a budget, not a bound."""
    el = next(lm.model.parameters()).element_size()
    hidden = int(getattr(lm.config.get_text_config(), "hidden_size", 0) or 0)
    heads = int(getattr(lm.config.get_text_config(), "num_attention_heads", 1) or 1)
    k, inter = 1, 0
    for v in lm.moe:
        per = sum(p[0].numel() for p in v.experts.parameters() if p.dim() >= 3 and p.shape[0] == v.num_experts)
        k, inter = max(k, v.top_k), max(inter, per // max(3 * hidden, 1))
    return el * (6 * k * (3 * inter + 2 * hidden) + 8 * hidden) + 4 * heads * seq_len


def windows_per_forward(lm: LoadedModel, seq_len: int, default: int, with_logits: bool = False) -> int:
    """How many windows of ``seq_len`` tokens one forward takes: ``default``, or fewer (at least 1) when ``lm``
    runs under a memory budget whose activation share they would exceed (``with_logits``: the forward also
    returns every position's logits)."""
    share = lm.activation_bytes
    if share is None:
        return default
    per = activation_bytes_per_token(lm, seq_len)
    if with_logits:
        per += next(lm.model.parameters()).element_size() * int(lm.config.get_text_config().vocab_size)
    return max(1, min(default, int(share // (per * seq_len))))


def zoo_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "zoo"


def bundled_names() -> list[str]:
    """Names of the trained models shipped in the package (``moekit:<name>``)."""
    root = zoo_dir()
    if not root.is_dir():
        return []
    return sorted(BUNDLED_PREFIX + p.name for p in root.iterdir() if (p / "config.json").is_file())


def check_checkpoint(path: str | os.PathLike) -> None:
    """One-line MoekitError for a local checkpoint that cannot load: ``config.json`` that is not a JSON
    object, a weight index that is not JSON or names a missing shard, a safetensors file with a bad
    or cut-short header or data section. Reads only the headers (cheap for any model size)."""
    import json

    root = Path(path)
    try:
        config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MoekitError(f"{root / 'config.json'} is not readable JSON ({_first_line(exc)})") from None
    if not isinstance(config, dict):
        raise MoekitError(f"{root / 'config.json'} is not a JSON object")
    files = {f for f in root.glob("*.safetensors") if f.is_file()}
    for index in root.glob("*.safetensors.index.json"):
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = set(weight_map.values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MoekitError(f"{index} is not a valid safetensors index ({_first_line(exc)})") from None
        for shard in shards:
            if not isinstance(shard, str) or not (root / shard).is_file():
                raise MoekitError(f"{root} is incomplete: shard {shard} listed in {index.name} is missing")
            files.add(root / shard)
    for f in sorted(files):
        _check_safetensors(f)


def _check_safetensors(path: Path) -> None:
    """A safetensors file whose header parses and whose tensors all lie inside the file."""
    import json

    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a safetensors header")
            n = int.from_bytes(head, "little")
            if n < 2 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit in {size} bytes")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        end = 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            lo, hi = info["data_offsets"]
            if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi):
                raise ValueError(f"bad offsets of tensor {name!r}")
            end = max(end, hi)
        if 8 + n + end != size:
            raise ValueError(f"{'truncated' if 8 + n + end > size else 'trailing bytes'}: the tensors end at byte "
                             f"{8 + n + end}, the file has {size}")
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise MoekitError(f"{path} is not a valid safetensors file ({_first_line(exc)})") from None


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device; an unknown or unavailable one → one-line MoekitError."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise MoekitError(f"unknown device {str(device)!r}; use cpu, cuda or cuda:N") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise MoekitError(f"device {str(device)!r} is not available: torch sees no CUDA GPU here")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise MoekitError(f"device {str(device)!r} does not exist: torch sees {torch.cuda.device_count()} GPU(s)")
    return d


def resolve(spec: str | os.PathLike) -> tuple[Path | None, str]:
    """Turn a model spec into (local directory or None for a hub id, display name)."""
    s = str(spec)
    if s.startswith(BUNDLED_PREFIX):
        path = zoo_dir() / s[len(BUNDLED_PREFIX):]
        if not (path / "config.json").is_file():
            names = ", ".join(bundled_names()) or "none built yet"
            raise MoekitError(f"unknown bundled model {s!r}; bundled models: {names}")
        check_checkpoint(path)
        return path, s
    p = Path(s).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise MoekitError(f"{p} is not a model directory (no config.json)")
        check_checkpoint(p)
        return p, s
    if s.count("/") == 1 and not s.startswith((".", "/", "~")):
        return None, s  # hub id
    raise MoekitError(f"model {s!r} not found: give a local checkpoint directory, a hub id or a bundled name")


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``"auto"``/None → None (the checkpoint's), a name or torch dtype → that torch dtype; else a MoekitError."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    name = str(dtype).replace("torch.", "")
    if name not in DTYPES:
        raise MoekitError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_dtype(dtype: torch.dtype | str | None, path: Path | None) -> torch.dtype:
    """The dtype to load ``path`` in: ``dtype`` when given, else the checkpoint's (config, else headers)."""
    dt = parse_dtype(dtype)
    if dt is not None:
        return dt
    if path is None:
        return torch.float32
    qcfg = Path(path) / QUANT_CONFIG
    if qcfg.is_file():
        import json

        try:
            return DTYPES.get(json.loads(qcfg.read_text()).get("dtype")) or torch.float32
        except ValueError:
            return torch.float32
    return checkpoint_dtype(path)


def load(
    spec: str | os.PathLike = DEFAULT_MODEL,
    dtype: torch.dtype | str | None = "auto",
    device: str | torch.device = "cpu",
    with_tokenizer: bool = True,
    distributed_config=None,
    packed_experts: bool = False,
) -> LoadedModel:
    """Load ``spec`` (hub id, local directory or ``moekit:<name>``) in eval mode and map its experts.

    ``distributed_config`` (a transformers ``DistributedConfig``, inside a torch.distributed job) shards the
    model with transformers' own parallel plans, e.g. expert parallelism (see ``moekit.distributed``).

    ``dtype``: ``"auto"`` (default) keeps the checkpoint's dtype; or ``bfloat16``/``float16``/``float32``.

    ``packed_experts`` (moekit quantized checkpoints only): keep int4 experts packed in memory, run by moekit's
    int4 kernel (see ``moekit.models.quantized.load_quantized``).
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    device = check_device(device)
    path, name = resolve(spec)
    source = str(path) if path is not None else name
    quiet_transformers()
    if path is None:
        source = hub_snapshot(name)
    dtype = resolve_dtype(dtype, Path(source))
    quantized = path is not None and is_quantized_checkpoint(path)
    if packed_experts and not quantized:
        raise MoekitError(f"packed experts need a moekit quantized checkpoint (moekit quantize); {source} is not one")
    try:
        if quantized:
            model = load_quantized(path, dtype=dtype, packed_experts=packed_experts)
        elif distributed_config is not None:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, distributed_config=distributed_config)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except MoekitError:
        raise
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        if path is None:
            raise MoekitError(
                f"could not load {name!r} from the Hugging Face hub ({_first_line(exc)}); "
                "if you are offline, download it and pass its local directory instead"
            ) from None
        raise MoekitError(f"could not load the model in {path}: {_first_line(exc)}") from None
    if distributed_config is None:
        model.to(device)
    model.eval()
    tokenizer = load_tokenizer_from(source) if with_tokenizer else None
    return LoadedModel(model=model, tokenizer=tokenizer, moe=build_moe_map(model), name=name, path=path)


def from_model(model: nn.Module, tokenizer=None, name: str | None = None) -> LoadedModel:
    """Wrap an already-built HF model (e.g. from ``moekit.testing.tiny_model``)."""
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, moe=build_moe_map(model),
                       name=name or getattr(model.config, "model_type", "model"))


def quiet_transformers() -> None:
    """Keep transformers' per-load progress bars and advisory warnings out of moekit's output.

    With ``MOEKIT_TRANSFORMERS_WARNINGS=1`` (the test suite sets it) warnings still print nowhere, but reach
    any handler attached to the ``transformers`` logger, so the tests can fail on deprecations.
    """
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if os.environ.get("MOEKIT_TRANSFORMERS_WARNINGS", "0") in ("0", ""):
        hf_logging.set_verbosity_error()
        return
    hf_logging.disable_default_handler()
    root = hf_logging.get_logger()
    if not any(isinstance(h, logging.NullHandler) for h in root.handlers):
        root.addHandler(logging.NullHandler())  # no "last resort" printing to stderr either
    hf_logging.set_verbosity_warning()


def hub_snapshot(hub_id: str) -> str:
    """A local directory for ``hub_id``: the HF cache if it has it, else a download.

    Fails in seconds (not after minutes of retries) when the hub cannot be reached.
    """
    import socket

    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(hub_id, local_files_only=True)
    except Exception:  # noqa: BLE001  (not cached: fall through to the network)
        local = None
    if local is not None:
        check_checkpoint(local)
        return local
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise MoekitError(f"{hub_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                          "download it and pass its local directory instead")
    try:
        socket.create_connection(("huggingface.co", 443), timeout=5).close()
    except OSError:
        raise MoekitError(f"could not reach the Hugging Face hub to download {hub_id!r} (offline?); "
                          "download it elsewhere and pass its local directory instead") from None
    try:
        local = snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as exc:  # noqa: BLE001
        raise MoekitError(f"could not download {hub_id!r} from the Hugging Face hub: {_first_line(exc)}") from None
    check_checkpoint(local)
    return local


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else exc.__class__.__name__


_STRUCTURE = ("EXPERT_PARAMS", "expert_param_names", "bank_keys", "skeleton", "load_structure", "footprint",
              "read_weights")


def __getattr__(name: str):
    """The weightless structure and tensor-by-tensor reading moved to ``moekit.models.structure``; their
    names stay importable from here (resolved on first use: structure imports this module)."""
    if name in _STRUCTURE:
        from moekit.models import structure

        return getattr(structure, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
