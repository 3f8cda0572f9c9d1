"""Options whose choices are a registry's names: help and validation generated from the registry entries.

``choice_help(POLICIES, "Expert cache policy")`` → ``"Expert cache policy. lru: Least recently used; ..."``;
``choice_callback(POLICIES)`` checks the value while the command line is parsed (before any model loads) and
fails with the registry's one-line error naming every choice; an old name (alias) reads as its new one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from moekit.registry import Registry


def choice_help(registry: Registry, what: str, options: Mapping[str, str] | None = None) -> str:
    """``what`` followed by every choice with its help (and the options it needs, per ``options``)."""
    return f"{what}. {registry.describe(options)}."


def choice_callback(registry: Registry) -> Callable:
    """A typer callback: the value must name an entry of ``registry`` (None passes: the option was not given)."""

    def callback(value: str | None) -> str | None:
        return None if value is None else registry.canonical(value)

    return callback
