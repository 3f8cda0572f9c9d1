"""``moekit serve``: an OpenAI-compatible HTTP server, optionally with offloaded experts."""

from __future__ import annotations

import contextlib

import typer

from moekit.cli.common import MODEL_HELP, app, console_err, load_model


def _policy_help() -> str:
    from moekit.serve.cache import POLICIES

    return "Expert cache policy: " + ", ".join(POLICIES.names()) + "."


@app.command("serve")
def serve_command(
    model: str = typer.Argument(None, help=MODEL_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (loopback by default)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    offload: bool = typer.Option(False, "--offload", help="Keep only a cache of experts in memory; read the "
                                 "others from the checkpoint on demand."),
    cache_mb: float = typer.Option(None, "--cache-mb", help="Expert cache budget in MB (default: 2·k experts "
                                   "per layer)."),
    policy: str = typer.Option("lru+prefetch", "--policy", help="Expert cache policy (lru, lfu, static, "
                               "lru+prefetch, none)."),
    device: str = typer.Option(None, "--device", help="Device of the model and the expert cache (cpu, cuda)."),
    profile: str = typer.Option(None, "--profile", help="Routing trace (.npz) giving the static policy's "
                                "expert frequencies."),
    name: str = typer.Option(None, "--name", help="Model id reported by /v1/models (default: MODEL)."),
    log_level: str = typer.Option("warning", "--log-level", help="uvicorn log level."),
) -> None:
    """Serve a model over the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics).

    Examples:\n
      moekit serve moekit:tiny --port 8000\n
      moekit serve ./olmoe --offload --cache-mb 2048 --policy lru+prefetch --device cuda
    """
    from moekit.serve.cache import POLICIES
    from moekit.serve.server import serve

    POLICIES.get(policy)
    if offload:
        from moekit.models import DEFAULT_MODEL
        from moekit.serve.engine import offload as offload_ctx
        from moekit.serve.store import load_offloaded

        with console_err.status(f"loading {model or DEFAULT_MODEL} (experts offloaded)"):
            lm = load_offloaded(model or DEFAULT_MODEL, device=device or "cpu")
        ctx = offload_ctx(lm, cache_mb=cache_mb, policy=policy, profile=profile)
    else:
        lm = load_model(model)
        if device:
            lm.model.to(device)
        ctx = contextlib.nullcontext()
    with ctx as engine:
        url = f"http://{host}:{port}"

        def ready() -> None:
            extra = f" (offloaded: {engine.slots} experts/layer, policy {policy})" if engine is not None else ""
            console_err.print(f"serving {lm.name} on {url}/v1{extra}; Ctrl-C to stop", highlight=False)

        serve(lm, host=host, port=port, engine=engine, log_level=log_level, model_name=name or lm.name,
              on_ready=ready)
    console_err.print("server stopped", highlight=False)
