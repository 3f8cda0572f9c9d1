"""``moekit serve``: an OpenAI-compatible HTTP server, optionally with offloaded experts."""

from __future__ import annotations

import contextlib

import typer

from moekit.cli.choices import choice_callback, choice_help
from moekit.cli.common import (
    DTYPE_OPTION,
    MAX_MEMORY_OPTION,
    MODEL_HELP,
    PACKED_EXPERTS_OPTION,
    app,
    console_err,
    load_model,
    use_fast_decode,
)
from moekit.errors import MoekitError
from moekit.serve import POLICIES

DEFAULT_MAX_BODY_BYTES = 1 << 20  # = moekit.serve.requests.DEFAULT_MAX_BODY_BYTES (not imported: keeps --help fast)


@app.command("serve")
def serve_command(
    model: str = typer.Argument(None, help=MODEL_HELP),
    dtype: str = DTYPE_OPTION,
    max_memory: str = MAX_MEMORY_OPTION,
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (loopback by default; "
                             "another address makes the model reachable from other machines, without authentication)."),
    port: int = typer.Option(8000, "--port", help="TCP port (0..65535; 0 picks a free one)."),
    max_body_bytes: int = typer.Option(DEFAULT_MAX_BODY_BYTES, "--max-body-bytes", help="Largest request body "
                                       "accepted; larger ones get HTTP 413 before they are read."),
    max_prompt_tokens: int = typer.Option(None, "--max-prompt-tokens", help="Largest prompt in tokens (default: "
                                          "the model's context); prompt + max_tokens must also fit the context."),
    offload: bool = typer.Option(False, "--offload", help="Keep only a cache of experts in memory; read the "
                                 "others from the checkpoint on demand."),
    cache_mb: float = typer.Option(None, "--cache-mb", help="Expert cache budget in MB (default: 2·k experts "
                                   "per layer)."),
    policy: str = typer.Option("lru+prefetch", "--policy", callback=choice_callback(POLICIES),
                               help=choice_help(POLICIES, "Expert cache policy")),
    device: str = typer.Option(None, "--device", help="Device of the model and the expert cache (cpu, cuda)."),
    profile: str = typer.Option(None, "--profile", help="Routing trace (.npz) giving the static policy's "
                                "expert frequencies."),
    name: str = typer.Option(None, "--name", help="Model id reported by /v1/models (default: MODEL)."),
    log_level: str = typer.Option("warning", "--log-level", help="uvicorn log level."),
    packed_experts: bool = PACKED_EXPERTS_OPTION,
) -> None:
    """Serve a model over the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics).

    Examples:\n
      moekit serve moekit:tiny --port 8000\n
      moekit serve ./olmoe --offload --cache-mb 2048 --policy lru+prefetch --device cuda\n
      moekit serve ./olmoe-int4 --packed-experts
    """
    from moekit.serve.process import is_loopback, listen, serve

    if max_body_bytes < 1:
        raise MoekitError(f"--max-body-bytes must be at least 1, not {max_body_bytes}")
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise MoekitError(f"--max-prompt-tokens must be at least 1, not {max_prompt_tokens}")
    if device:
        from moekit.models.loading import check_device

        check_device(device)
    if offload and max_memory:
        raise MoekitError("give --offload (with --cache-mb) or --max-memory, not both")
    sock = listen(host, port)  # before loading the model: a port in use fails at once
    port = sock.getsockname()[1]
    if not is_loopback(host):
        console_err.print(f"warning: listening on {host}: the model is reachable from other machines, "
                          "without authentication", highlight=False, soft_wrap=True)
    with contextlib.closing(sock):
        if offload:
            from moekit.models import DEFAULT_MODEL
            from moekit.serve.engine import offload as offload_ctx
            from moekit.serve.store import load_offloaded

            with console_err.status(f"loading {model or DEFAULT_MODEL} (experts offloaded)"):
                lm = load_offloaded(model or DEFAULT_MODEL, dtype=dtype, device=device or "cpu",
                                    packed_experts=packed_experts)
            use_fast_decode(lm)  # moekit's dispatch and CPU decode kernels (docs/nn.md)
            ctx = offload_ctx(lm, cache_mb=cache_mb, policy=policy, profile=profile)
        else:
            lm = load_model(model, dtype, max_memory, packed_experts=packed_experts)
            if device and lm.engine is None:
                lm.model.to(device)
            use_fast_decode(lm)  # moekit's dispatch and CPU decode kernels, offloaded or not (docs/nn.md)
            ctx = contextlib.nullcontext(lm.engine)
        with ctx as engine:
            url = f"http://{f'[{host}]' if ':' in host else host}:{port}"

            def ready() -> None:
                extra = f" (offloaded: {engine.slots} experts/layer, policy {policy})" if engine is not None else ""
                console_err.print(f"serving {lm.name} on {url}/v1{extra}; Ctrl-C to stop", highlight=False)

            serve(lm, host=host, port=port, engine=engine, log_level=log_level, model_name=name or lm.name,
                  on_ready=ready, max_body_bytes=max_body_bytes, max_prompt_tokens=max_prompt_tokens, sock=sock)
    console_err.print("server stopped", highlight=False)
