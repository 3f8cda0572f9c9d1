"""A tiny name → object registry, used for every family of methods (criteria, policies, routers...).

Each entry carries its one-line ``help`` and its ``needs`` (inputs beyond the model: calibration data, a
negative example set, marker tokens), so that the CLI generates its choices, help and
input checks from the registry instead of repeating them. An entry may be *lazy*: registered as
``"module:attr"`` and imported on first use, so that a lower layer can offer a method implemented in a
higher one (``generation.DECODERS`` → ``moekit.steer``) without importing it. Old names stay readable
through ``alias`` (saved configs written before a rename).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from moekit.errors import MoekitError

T = TypeVar("T")

# What an entry may need besides the model, and how to say so in an error.
NEEDS: dict[str, str] = {
    "calibration": "calibration data",
    "negative": "a second, contrasting example set",
    "markers": "marker tokens",
}


@dataclass(frozen=True)
class Entry:
    """One registered name: its help line, what it needs, and for a lazy entry its ``"module:attr"`` target."""

    name: str
    help: str
    needs: frozenset[str]
    target: str | None = None  # "module:attr" of a lazy entry (imported on the first get)


def _doc_line(obj: object) -> str:
    """The first paragraph of a class's or function's own docstring (an instance's class doc is not its help)."""
    if not (isinstance(obj, type) or inspect.isroutine(obj)):
        return ""
    doc = inspect.cleandoc(obj.__doc__ or "")  # its own, not inherited from a base class
    return " ".join(doc.strip().split("\n\n")[0].split())


class Registry(Generic[T]):
    """Maps a method name to its implementation, help text and needs, so the CLI can list and look up choices."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._objects: dict[str, T] = {}
        self._aliases: dict[str, tuple[str, str]] = {}

    # ----- registration ---------------------------------------------------------------------------------
    def _new(self, name: str, help: str, needs: Iterable[str], target: str | None = None) -> Entry:
        if name in self._entries or name in self._aliases:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        needs = frozenset(needs)
        unknown = needs - set(NEEDS)
        if unknown:
            raise ValueError(f"{self.kind} {name!r}: unknown needs {sorted(unknown)}; known: {sorted(NEEDS)}")
        if not help:
            raise ValueError(f"{self.kind} {name!r} has no help text (pass help= or give it a docstring)")
        entry = Entry(name, help, needs, target)
        self._entries[name] = entry
        return entry

    def register(self, name: str, help: str | None = None, needs: Iterable[str] = ()) -> Callable[[T], T]:
        """Decorator: ``@REG.register("lru")`` stores the object under ``name``; ``help`` defaults to the
        first paragraph of its docstring."""

        def deco(obj: T) -> T:
            self.add(name, obj, help=help, needs=needs)
            return obj

        return deco

    def add(self, name: str, obj: T, help: str | None = None, needs: Iterable[str] = ()) -> T:
        """Store ``obj`` under ``name`` (the non-decorator form of ``register``)."""
        self._new(name, help or _doc_line(obj), needs)
        self._objects[name] = obj
        return obj

    def register_lazy(self, name: str, target: str, help: str, needs: Iterable[str] = ()) -> None:
        """Register ``name`` as ``"package.module:attr"``, imported on the first ``get(name)``."""
        module, sep, attr = target.partition(":")
        if not (module and sep and attr):
            raise ValueError(f"{self.kind} {name!r}: lazy target must read 'module:attr', got {target!r}")
        self._new(name, help, needs, target)

    def alias(self, old: str, new: str, note: str) -> None:
        """Keep ``old`` readable as ``new`` (e.g. in configs saved before a rename); ``note`` says why."""
        if new not in self._entries:
            raise ValueError(f"{self.kind} alias {old!r} → unknown {new!r}")
        if old in self._entries or old in self._aliases:
            raise ValueError(f"{self.kind} {old!r} is registered twice")
        self._aliases[old] = (new, note)

    # ----- lookup ---------------------------------------------------------------------------------------
    def canonical(self, name: str) -> str:
        """The registered name ``name`` stands for (itself, or the target of an alias), or a one-line error
        listing the choices. Imports nothing."""
        if name in self._entries:
            return name
        if name in self._aliases:
            return self._aliases[name][0]
        raise MoekitError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}")

    def get(self, name: str) -> T:
        """The object registered as ``name`` (an alias resolves; a lazy entry is imported now)."""
        name = self.canonical(name)
        if name not in self._objects:
            module, _, attr = (self._entries[name].target or "").partition(":")
            self._objects[name] = getattr(importlib.import_module(module), attr)
        return self._objects[name]

    def entry(self, name: str) -> Entry:
        return self._entries[self.canonical(name)]

    def help(self, name: str) -> str:
        return self.entry(name).help

    def needs(self, name: str) -> frozenset[str]:
        return self.entry(name).needs

    def check_needs(self, name: str, given: Iterable[str], options: Mapping[str, str] | None = None) -> None:
        """Raise a one-line error when ``name`` needs an input that is not among ``given``; ``options`` maps a
        need to the option that supplies it (``{"negative": "--neg"}``) for the message."""
        missing = sorted(self.needs(name) - set(given))
        if missing:
            what = " and ".join(NEEDS[m] + (f" ({options[m]})" if options and m in options else "") for m in missing)
            raise MoekitError(f"{self.kind} {self.canonical(name)} needs {what}")

    def names(self) -> list[str]:
        """Registered names in registration order (aliases excluded)."""
        return list(self._entries)

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def aliases(self) -> dict[str, str]:
        """Old name → current name."""
        return {old: new for old, (new, _) in self._aliases.items()}

    def describe(self, options: Mapping[str, str] | None = None, sep: str = "; ") -> str:
        """``"name: help; name: help (needs --neg)"`` — the choices, their help and, where ``options`` maps a
        need to the option that supplies it, what each needs: one line for a CLI option's help."""

        def needs(e: Entry) -> str:
            given = [options[n] for n in sorted(e.needs) if options and n in options]
            return f" (needs {', '.join(given)})" if given else ""

        return sep.join(f"{e.name}: {e.help.rstrip('.')}{needs(e)}" for e in self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
