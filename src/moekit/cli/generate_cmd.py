"""``moekit generate``: generate text with routing interventions, streamed to the terminal."""

from __future__ import annotations

import sys

import typer

from moekit.cli.choices import choice_callback, choice_help
from moekit.cli.common import (
    DTYPE_OPTION,
    MAX_MEMORY_OPTION,
    MODEL_HELP,
    PACKED_EXPERTS_OPTION,
    app,
    emit_json,
    finite_non_negative,
    float_option,
    load_model,
    non_negative_int,
    parse_expert_values,
    parse_experts,
    positive_int,
    probability_mass,
    seed_int,
    use_fast_decode,
)
from moekit.generation import DECODERS
from moekit.serve import POLICIES


def parse_routing(disable: str | None = None, force: str | None = None, boost: str | None = None,
                  bias: str | None = None, top_k: int | None = None, top_p: float | None = None,
                  steer: list[str] | None = None):
    """The model-independent part of the routing options, checked before the model loads: expert lists,
    finite boost (>= 0) and bias values, top-k/top-p, and the --steer specs and their files."""
    from moekit.errors import MoekitError
    from moekit.routing import RoutingControl
    from moekit.steer.presets import load_experts, parse_steer

    if top_k is not None and top_p is not None:
        raise MoekitError("give --top-k or --top-p, not both")
    for spec in steer or []:
        load_experts(parse_steer(spec)[0])
    return RoutingControl.make(parse_experts(disable, "--disable expert"), parse_experts(force, "--force expert"),
                               parse_expert_values(boost, "--boost", lo=0.0),
                               parse_expert_values(bias, "--bias"), top_k, top_p)


def build_control(lm, disable: str | None = None, force: str | None = None, boost: str | None = None,
                  top_k: int | None = None, top_p: float | None = None, steer: list[str] | None = None,
                  bias: str | None = None):
    """The RoutingControl for the command's options (validated against the model)."""
    from moekit.routing import merge
    from moekit.steer.presets import control_from_spec

    parts = [parse_routing(disable, force, boost, bias, top_k, top_p, steer)]
    parts += [control_from_spec(s, lm) for s in steer or []]
    ctrl = merge(parts)
    ctrl.validate(lm.moe)
    return ctrl


@app.command("generate")
def generate_command(
    model: str = typer.Argument(None, help=MODEL_HELP),
    dtype: str = DTYPE_OPTION,
    max_memory: str = MAX_MEMORY_OPTION,
    prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt text."),
    disable: str = typer.Option(None, "--disable", help="Experts never selected, e.g. 3:5,4:1, or an expert-set "
                                "JSON file (docs/experts.md), e.g. super.json."),
    force: str = typer.Option(None, "--force", help="Experts always selected (at most k per layer), e.g. 3:5, "
                              "or an expert-set JSON file."),
    boost: str = typer.Option(None, "--boost", help="Scale routing weights, e.g. 3:5=2.0,4:1=0.5 (FILE=X: every "
                              "expert of an expert-set file)."),
    bias: str = typer.Option(None, "--bias", help="Add to router logits before selection, e.g. 3:5=1.5 (or FILE=X)."),
    top_k: int = typer.Option(None, "--top-k", callback=positive_int, help="Experts per token (routing)."),
    top_p: float = typer.Option(None, "--top-p", callback=probability_mass, help="Top-p routing: experts up to cumulative router mass p."),
    steer: list[str] = typer.Option(None, "--steer", help="FILE:off|on|boost=X[:N] from `moekit steer find`."),
    max_tokens: int = typer.Option(64, "--max-tokens", callback=positive_int, help="New tokens at most."),
    temperature: float = typer.Option(0.0, "--temperature", callback=finite_non_negative, help="0: greedy."),
    sample_top_p: float = typer.Option(1.0, "--sample-top-p", callback=probability_mass, help="Nucleus sampling mass (with --temperature)."),
    seed: int = typer.Option(None, "--seed", callback=seed_int, help="Sampling seed (reproducible output)."),
    stop: list[str] = typer.Option(None, "--stop", help="Stop before this string (repeatable)."),
    contrast: float = typer.Option(None, "--contrast", callback=finite_non_negative, help=f"{DECODERS.help('contrast')}; strength beta >= 0."),
    contrast_alpha: float = typer.Option(0.1, "--contrast-alpha", callback=float_option(0.0, 1.0), help="SCMoE plausibility cut alpha."),
    weak_top_k: int = typer.Option(1, "--weak-top-k", callback=positive_int, help="SCMoE weak routing: experts per token."),
    rewire: bool = typer.Option(False, "--rewire", help=f"{DECODERS.help('rewire')}."),
    rewire_every: int = typer.Option(32, "--rewire-every", callback=non_negative_int, help="Re-adapt every N generated tokens (0: prefill only)."),
    rewire_steps: int = typer.Option(5, "--rewire-steps", callback=positive_int, help="Adam steps per adaptation."),
    rewire_lr: float = typer.Option(0.03, "--rewire-lr", callback=float_option(0.0, lo_open=True), help="Adam learning rate for the biases."),
    rewire_layers: str = typer.Option(None, "--rewire-layers", help="Comma-separated MoE layers (default: all)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON instead of streaming."),
    offload: bool = typer.Option(False, "--offload", help="Keep only a cache of experts in memory; read the others "
                                 "from the checkpoint on demand (moekit.serve)."),
    cache_mb: float = typer.Option(None, "--cache-mb", callback=float_option(0.0, lo_open=True), help="With --offload: expert cache budget in MB "
                                   "(default: 2·k experts per layer)."),
    policy: str = typer.Option("lru+prefetch", "--policy", callback=choice_callback(POLICIES),
                               help=choice_help(POLICIES, "With --offload: expert cache policy")),
    offload_stats: bool = typer.Option(False, "--stats", help="With --offload or an offloading --max-memory: "
                                       "report the cache statistics."),
    packed_experts: bool = PACKED_EXPERTS_OPTION,
) -> None:
    """Generate text, optionally steering the experts.

    Examples:\n
      moekit generate moekit:tiny --prompt "17 + 25 ="\n
      moekit generate moekit:tiny --prompt "The river" --disable 1:3,2:7 --temperature 0.8 --seed 1\n
      moekit generate moekit:tiny --prompt "seven plus" --steer digits.json:on\n
      moekit generate moekit:tiny --prompt "17 + 25 =" --contrast 0.5\n
      moekit generate moekit:tiny --prompt "def f(x):" --rewire --max-tokens 32\n
      moekit generate tiny-int4 --prompt "The river" --packed-experts
    """
    from moekit.errors import MoekitError

    if contrast is not None and rewire:
        raise MoekitError("choose one decoding strategy: --contrast or --rewire")
    strategy, options = "plain", {}
    if contrast is not None:
        strategy, options = "contrast", {"beta": contrast, "alpha": contrast_alpha, "weak_top_k": weak_top_k}
    elif rewire:
        try:
            layers = [int(x) for x in rewire_layers.split(",")] if rewire_layers else None
            if layers and min(layers) < 0:
                raise ValueError
        except ValueError:
            raise MoekitError(f"bad --rewire-layers {rewire_layers!r}: write e.g. 1,3") from None
        strategy, options = "rewire", {"layers": layers, "every": rewire_every, "steps": rewire_steps,
                                       "lr": rewire_lr}
    if offload and rewire:
        raise MoekitError("--offload does not support --rewire (it needs gradients through the experts)")
    parse_routing(disable, force, boost, bias, top_k, top_p, steer)  # bad options fail before the model loads
    if offload and max_memory:
        raise MoekitError("give --offload (with --cache-mb) or --max-memory, not both")
    if packed_experts and rewire:
        raise MoekitError("--packed-experts runs the experts without gradients: not with --rewire")
    lm = (_load_offloaded(model, dtype, packed_experts) if offload
          else load_model(model, dtype, max_memory, packed_experts=packed_experts))
    use_fast_decode(lm)  # moekit's dispatch and CPU decode kernels, offloaded or not (docs/nn.md)
    if lm.tokenizer is None:
        raise MoekitError(f"this model ({lm.name}) has no tokenizer; --prompt text needs one: copy the base "
                          "model's tokenizer files (tokenizer.json, tokenizer_config.json) into its directory")
    if rewire and options["layers"]:
        for li in options["layers"]:
            lm.moe.layer(li)
    control = build_control(lm, disable, force, boost, top_k, top_p, steer, bias)
    import contextlib

    ctx = contextlib.nullcontext(lm.engine)
    if offload:
        from moekit.serve import offload as offload_ctx

        ctx = offload_ctx(lm, cache_mb=cache_mb, policy=policy)
    with ctx as engine:
        _run(lm, prompt, max_tokens, temperature, sample_top_p, seed, stop, control, strategy, options, json_out,
             engine if offload_stats and engine is not None else None)


def _load_offloaded(model: str | None, dtype: str | None = "auto", packed_experts: bool = False):
    from moekit.cli.common import console_err
    from moekit.models import DEFAULT_MODEL
    from moekit.serve import load_offloaded

    with console_err.status(f"loading {model or DEFAULT_MODEL} (experts offloaded)"):
        return load_offloaded(model or DEFAULT_MODEL, dtype=dtype, packed_experts=packed_experts)


def _run(lm, prompt, max_tokens, temperature, sample_top_p, seed, stop, control, strategy, options, json_out,
         engine) -> None:
    from moekit.generation import GenerationResult, stream

    result = GenerationResult("", [], 0, "length")
    pieces = stream(lm, prompt, max_new_tokens=max_tokens, temperature=temperature, top_p=sample_top_p, seed=seed,
                    stop=stop or (), control=control, strategy=strategy, strategy_options=options, result=result)
    if json_out:
        for _ in pieces:
            pass
        emit_json({"model": lm.name, "prompt": prompt, "text": result.text, "token_ids": result.token_ids,
                   "prompt_tokens": result.prompt_tokens, "finish_reason": result.finish_reason,
                   "strategy": strategy, "control": _describe(control), "stats": result.stats,
                   **({"offload": engine.stats()} if engine is not None else {})})
        return
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if engine is not None:
        import json

        sys.stderr.write(json.dumps(engine.stats(), default=str) + "\n")


def _describe(control) -> dict:
    from moekit.experts import ExpertSet

    return {"disable": ExpertSet(control.disable).to_list(), "force": ExpertSet(control.force).to_list(),
            "scale": {str(k): v for k, v in sorted(control.scale.items())},
            "bias": {str(k): v for k, v in sorted(control.bias.items())},
            "top_k": control.top_k, "top_p": control.top_p}
