"""``moekit adapt train|select|compose``: adapter experts (MoE-LoRA) and ROCKET K-shot assembly."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from moekit.cli.choices import choice_callback, choice_help
from moekit.cli.common import (
    MODEL_HELP,
    app,
    check_output,
    console,
    emit_json,
    finite_non_negative,
    float_option,
    load_model,
    non_negative_int,
    positive_int,
    probability_mass,
    seed_int,
)
from moekit.data.corpus import CORPUS_SPEC_HELP

learning_rate = float_option(0.0, 10.0, lo_open=True, hi_open=True)

adapt_app = typer.Typer(help="Adapter experts (MoE-LoRA) as PEFT adapters; ROCKET K-shot selection and assembly.",
                        no_args_is_help=True)
app.add_typer(adapt_app, name="adapt")


def _method_help() -> str:
    from moekit.adapters import METHODS

    return choice_help(METHODS, "Adapter method")


def _methods_with(flag: str) -> str:
    """The adapter methods whose registry entry sets ``flag`` (``uses_active``, ``uses_experts``)."""
    from moekit.adapters import METHODS

    return ", ".join(n for n in METHODS.names() if getattr(METHODS.get(n), flag))


def _method_choice(value: str | None) -> str | None:
    from moekit.adapters import METHODS

    return choice_callback(METHODS)(value)


def _target_help() -> str:
    from moekit.adapters import TARGETS

    return "; ".join(f"{k}: {v}" for k, v in TARGETS.items()) + "; or comma-separated module names"


@adapt_app.command("train")
def train_command(
    model: str = typer.Argument(None, help=MODEL_HELP),
    method: str = typer.Option("lora", "--method", "-m", callback=_method_choice, help=_method_help()),
    rank: int = typer.Option(8, "--rank", "-r", callback=positive_int, help="LoRA rank r (per expert with --target experts)."),
    active: int = typer.Option(None, "--active", callback=positive_int, help=f"Active ranks per token ({_methods_with('uses_active')})."),
    experts: int = typer.Option(None, "--experts", callback=positive_int, help=f"LoRA experts per layer ({_methods_with('uses_experts')})."),
    top_k: int = typer.Option(None, "--top-k", callback=non_negative_int, help="Experts per token (mixlora; 0 = dense)."),
    target: str = typer.Option("attention", "--target", "-t", help=_target_help()),
    alpha: float = typer.Option(None, "--alpha", callback=finite_non_negative, help="LoRA alpha (default 2·rank)."),
    data: list[str] = typer.Option(["moekit:corpus:train"], "--data", "-d",
                                   help=f"Text/JSONL files or {CORPUS_SPEC_HELP}."),
    steps: int = typer.Option(200, "--steps", callback=positive_int, help="Optimizer steps."),
    lr: float = typer.Option(1e-3, "--lr", callback=learning_rate, help="AdamW learning rate."),
    batch_size: int = typer.Option(8, "--batch-size", callback=positive_int),
    seq_len: int = typer.Option(128, "--seq-len", callback=positive_int, help="Window length in tokens."),
    seed: int = typer.Option(0, "--seed", callback=seed_int),
    out: str = typer.Option(..., "--out", "-o", help="Adapter directory to write (PEFT format)."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Train an adapter on a frozen model and save it as a PEFT adapter.

    Load it back with ``PeftModel.from_pretrained(base, OUT)`` after ``import moekit.adapters``.

    Examples:\n
      moekit adapt train moekit:tiny --method flylora --rank 32 --active 8 --data moekit:corpus:train:code --out ad/code\n
      moekit adapt train ./olmoe --method lora --target experts --data notes.jsonl --out ad/notes
    """
    from moekit.adapters import attach, make_config, save_adapter
    from moekit.adapters.train import train_adapter
    from moekit.data import read_documents

    check_output(out, force, kind="dir")
    docs = read_documents(data)
    lm = load_model(model)
    config = make_config(lm.model, method, rank=rank, active=active, target=target, alpha=alpha, seed=seed,
                         experts=experts, top_k=top_k)
    peft_model = attach(lm.model, config)
    log = train_adapter(peft_model, lm.tokenizer, docs, steps=steps, lr=lr, batch_size=batch_size,
                        seq_len=seq_len, seed=seed, progress=not json_out)
    summary = {"out": out, "model": lm.name, "method": method, "rank": rank, "target": target,
               "final_loss": log["final_loss"], "tokens": log["tokens"], "tokens_per_s": log["tokens_per_s"],
               "load_cv": log["load_cv"], "trainable_params": log["trainable_params"]}
    save_adapter(peft_model, out, force=force, extra={**summary, "data": data, "loss": log["loss"]})
    if json_out:
        emit_json(summary)
        return
    cv = "" if log["load_cv"] is None else f", load CV {log['load_cv']:.3f}"
    console.print(f"{method} adapter ({log['trainable_params']:,} trainable parameters) trained {steps} steps: "
                  f"loss {log['final_loss']:.3f}{cv}; saved to {out}")


@adapt_app.command("select")
def select_command(
    pool: str = typer.Option(..., "--pool", help="Directory of LoRA adapters (one per subdirectory)."),
    data: str = typer.Option(..., "--data", "-d",
                             help='K-shot task file: JSONL {"prompt","answer"} (or {"text"}), or text lines.'),
    shots: int = typer.Option(16, "--shots", "-k", callback=positive_int, help="Use the first K examples."),
    keep: int = typer.Option(4, "--keep", callback=positive_int, help="Experts to keep (N)."),
    candidates: int = typer.Option(None, "--candidates", callback=positive_int, help="Best-ranked adapters to choose from (M; default 2N)."),
    model: str = typer.Option(None, "--model", help=MODEL_HELP + " Default: the pool's base model."),
    out: str = typer.Option(..., "--out", "-o", help="JSON file with the chosen experts."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """ROCKET selection: rank a LoRA pool on K examples (exact match, perplexity), keep the most diverse N.

    Examples:\n
      moekit adapt select --pool ad/ --shots 16 --data task.jsonl --keep 4 --out chosen.json
    """
    from moekit.adapters.rocket import pool_adapters, read_shots, select
    from moekit.adapters.util import pool_base_model
    from moekit.io import atomic_write

    check_output(out, force, kind="json")
    dirs = pool_adapters(pool)
    task = read_shots(data, shots)
    lm = load_model(model or pool_base_model(dirs))
    result = select(lm, pool, task, keep=keep, candidates=candidates, progress=not json_out)
    result["model"] = lm.name
    with atomic_write(out, force=force, mode="w", kind="json") as fh:
        fh.write(json.dumps(result, indent=2) + "\n")
    if json_out:
        emit_json(result)
        return
    for row in result["ranking"]:
        em = "n/a" if row["exact_match"] is None else f"{row['exact_match']:.3f}"
        mark = "*" if row["adapter"] in result["experts"] else " "
        console.print(f"{mark} {row['adapter']}: perplexity {row['perplexity']:.3f}, exact match {em}")
    console.print(f"kept {len(result['experts'])} experts (diversity {result['diversity']:.3f}) → {out}")


@adapt_app.command("compose")
def compose_command(
    model: str = typer.Argument(None, help=MODEL_HELP),
    experts: str = typer.Option(..., "--experts", help="JSON from `moekit adapt select` (an \"experts\" list)."),
    top_k: int = typer.Option(2, "--top-k", callback=positive_int, help="Experts per token."),
    data: str = typer.Option(..., "--data", "-d", help="K-shot task file (as for select)."),
    shots: int = typer.Option(None, "--shots", "-k", callback=positive_int, help="Use the first K examples (default: all)."),
    retrieve_from: list[str] = typer.Option([], "--retrieve",
                                            help="Also train on the most similar documents of these files."),
    budget: int = typer.Option(0, "--budget", callback=non_negative_int, help="How many documents to retrieve."),
    dedup: float = typer.Option(0.9, "--dedup", callback=probability_mass, help="Skip a retrieved document this similar to a chosen one."),
    steps: int = typer.Option(100, "--steps", callback=positive_int),
    lr: float = typer.Option(1e-3, "--lr", callback=learning_rate),
    batch_size: int = typer.Option(8, "--batch-size", callback=positive_int),
    seq_len: int = typer.Option(128, "--seq-len"),
    seed: int = typer.Option(0, "--seed", callback=seed_int),
    out: str = typer.Option(..., "--out", "-o", help="Adapter directory to write (PEFT format)."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """ROCKET assembly: a token-level top-k MoE of the chosen LoRAs; router and experts trained together.

    Examples:\n
      moekit adapt compose moekit:tiny --experts chosen.json --top-k 2 --data task.jsonl --out ad/moe
    """
    from moekit.adapters import save_adapter
    from moekit.adapters.rocket import compose, read_selection, read_shots, retrieve
    from moekit.adapters.train import train_adapter
    from moekit.data import read_documents
    from moekit.data.corpus import Document
    from moekit.errors import MoekitError

    check_output(out, force, kind="dir")
    chosen = read_selection(experts)
    task = read_shots(data, shots)
    pool_docs = read_documents(retrieve_from) if retrieve_from else []
    if budget and not pool_docs:
        raise MoekitError("--budget needs --retrieve FILE to retrieve from")
    lm = load_model(model)
    extra = retrieve(lm, task, pool_docs, budget, dedup) if budget else []
    peft_model = compose(lm, chosen, top_k=top_k, seed=seed)
    docs = [Document(s.text, "task", f"shot:{i}", data) for i, s in enumerate(task)] + extra
    log = train_adapter(peft_model, lm.tokenizer, docs, steps=steps, lr=lr, batch_size=batch_size,
                        seq_len=seq_len, seed=seed, progress=not json_out)
    summary = {"out": out, "model": lm.name, "experts": [str(c) for c in chosen], "top_k": top_k,
               "shots": len(task), "retrieved": len(extra), "final_loss": log["final_loss"],
               "load_cv": log["load_cv"]}
    save_adapter(peft_model, out, force=force, extra={**summary, "loss": log["loss"]})
    if json_out:
        emit_json(summary)
        return
    console.print(f"MoE of {len(chosen)} LoRA experts (top-{top_k}) trained {steps} steps on {len(task)} shots"
                  f" + {len(extra)} retrieved documents: loss {log['final_loss']:.3f}; saved to {Path(out)}")
