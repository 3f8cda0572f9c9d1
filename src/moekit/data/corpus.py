"""Read the bundled multi-domain corpus (``moekit:corpus``) and user data files as documents.

The corpus ships inside the package (``moekit/data/corpus/``) as one gzip'd JSONL file per split, so
every command has real text to run on offline. User data goes through :func:`read_documents`, which
turns plain text or JSONL files into the same :class:`Document` records and reports bad input as a
one-line :class:`~moekit.errors.MoekitError`.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from moekit.errors import MoekitError

SPLITS = ("train", "validation", "test")
CORPUS_SPEC = "moekit:corpus"
DEFAULT_SPEC_SPLIT = "test"


@dataclass(frozen=True)
class Document:
    """One document: its text, a domain label, a corpus-unique id and where the text came from."""

    text: str
    domain: str
    doc_id: str
    source: str


def corpus_path() -> Path:
    """The folder holding the bundled corpus files (``<split>.jsonl.gz`` and ``meta.json``)."""
    return Path(__file__).resolve().parent / "corpus"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise MoekitError(f"unknown corpus split {split!r}; choose one of {', '.join(SPLITS)}")


@functools.cache
def _load_split(split: str) -> tuple[Document, ...]:
    path = corpus_path() / f"{split}.jsonl.gz"
    if not path.is_file():
        raise MoekitError(f"bundled corpus file {path} is missing; rebuild it with scripts/build_corpus.py")
    docs = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            try:
                row = json.loads(line)
                docs.append(Document(row["text"], row["domain"], row["doc_id"], row["source"]))
            except (ValueError, KeyError, TypeError) as exc:
                raise MoekitError(f"{path}:{lineno}: corrupted corpus line ({exc})") from None
    return tuple(docs)


def load_corpus(split: str = "train") -> list[Document]:
    """All documents of one bundled split ('train', 'validation' or 'test'), in file order."""
    _check_split(split)
    return list(_load_split(split))


@functools.lru_cache(maxsize=1)
def corpus_meta() -> dict:
    """The corpus's ``meta.json``: domains, per-split and per-domain counts, build information."""
    path = corpus_path() / "meta.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MoekitError(f"cannot read bundled corpus metadata {path}: {exc}") from None


def domains() -> list[str]:
    """The domain labels of the bundled corpus, sorted."""
    return list(corpus_meta()["domains"])


CORPUS_SPEC_HELP = "moekit:corpus[:SPLIT[:DOMAIN[,DOMAIN...]]]"
"""The one grammar of a bundled-corpus spec, accepted wherever text data is read (``--data``, ``--calib``,
``steer find --pos/--neg``): SPLIT is train, validation or test (default test), DOMAIN keeps only those
domains, e.g. ``moekit:corpus:train:code,prose``."""


@dataclass(frozen=True)
class CorpusSpec:
    """A parsed ``moekit:corpus[:SPLIT[:DOMAIN[,DOMAIN...]]]``: the split and the domains kept (None: all)."""

    split: str
    domains: tuple[str, ...] | None = None


def parse_corpus_spec(spec: str) -> CorpusSpec | None:
    """Parse a bundled-corpus spec; None when ``spec`` is not one (a file path). A spec that starts with
    ``moekit:corpus`` but breaks the grammar, or names an unknown split or domain, → MoekitError."""
    spec = str(spec)
    if not spec.startswith(CORPUS_SPEC):
        return None
    parts = spec.split(":")
    if parts[:2] != ["moekit", "corpus"] or len(parts) > 4:
        raise MoekitError(f"bad corpus spec {spec!r}: write {CORPUS_SPEC_HELP}, e.g. moekit:corpus:train:code")
    split = parts[2] if len(parts) > 2 and parts[2] else DEFAULT_SPEC_SPLIT
    _check_split(split)
    if len(parts) < 4:
        return CorpusSpec(split)
    names = [d.strip() for d in parts[3].split(",")]
    known = domains()
    for d in names:
        if d not in known:
            raise MoekitError(f"unknown corpus domain {d!r} in {spec!r}; choose from {', '.join(known)}")
    return CorpusSpec(split, tuple(dict.fromkeys(names)))


def corpus_documents(spec: CorpusSpec) -> list[Document]:
    """The bundled documents a parsed corpus spec names, in file order."""
    docs = load_corpus(spec.split)
    if spec.domains is not None:
        docs = [d for d in docs if d.domain in spec.domains]
    return docs


def read_text_file(path: Path, what: str = "data file") -> str:
    """The UTF-8 text of a user file; missing, unreadable, non-UTF-8 or empty → one-line MoekitError."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MoekitError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise MoekitError(f"{what} {path} is a directory, expected a text or JSONL file") from None
    except OSError as exc:
        raise MoekitError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MoekitError(f"{what} {path} is not UTF-8 text (byte {exc.start})") from None
    if not text.strip():
        raise MoekitError(f"{what} {path} is empty")
    return text


def jsonl_rows(path: Path, text: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-empty JSONL line; bad JSON or a non-object → MoekitError."""
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise MoekitError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise MoekitError(f"{path}:{lineno}: expected a JSON object")
        yield lineno, row


def _read_jsonl(path: Path, text: str) -> list[Document]:
    docs = []
    for lineno, row in jsonl_rows(path, text):
        if not isinstance(row.get("text"), str):
            raise MoekitError(f'{path}:{lineno}: expected a JSON object with a string "text" field')
        domain = row.get("domain", path.stem)
        if not isinstance(domain, str) or not domain:
            raise MoekitError(f'{path}:{lineno}: "domain" must be a non-empty string')
        doc_id = f"{path.name}:{lineno}"
        docs.append(Document(row["text"], domain, doc_id, str(path)))
    return docs


def read_documents(paths: list[str | os.PathLike]) -> list[Document]:
    """Read documents from user files or bundled-corpus specs, in the order given.

    - ``moekit:corpus[:SPLIT[:DOMAIN[,DOMAIN...]]]`` (``CORPUS_SPEC_HELP``): the bundled split (default
      test), optionally only some domains;
    - ``*.jsonl``: one document per line, ``{"text": ..., "domain": ...}`` (domain
      optional, defaults to the file stem);
    - any other file: plain UTF-8 text, one document, domain = file stem.

    Missing, unreadable or empty files and bad JSONL lines raise MoekitError naming the file (and line).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    docs: list[Document] = []
    for item in paths:
        spec = parse_corpus_spec(str(item))
        if spec is not None:
            docs.extend(corpus_documents(spec))
            continue
        path = Path(item)
        text = read_text_file(path)
        if path.suffix.lower() == ".jsonl":
            docs.extend(_read_jsonl(path, text))
        else:
            docs.append(Document(text, path.stem, path.name, str(path)))
    return docs


def tokenizer_path() -> Path:
    """The folder holding the bundled BPE tokenizer in Hugging Face format."""
    return Path(__file__).resolve().parent / "tokenizer"


def load_tokenizer():
    """Load the bundled tokenizer with ``transformers.AutoTokenizer`` (offline, from the package)."""
    from transformers import AutoTokenizer

    path = tokenizer_path()
    if not (path / "tokenizer.json").is_file():
        raise MoekitError(f"bundled tokenizer {path} is missing; rebuild it with scripts/train_tokenizer.py")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def interleave_domains(docs: Sequence[Document]) -> list[Document]:
    """Documents reordered round-robin over their domains (order kept within a domain), so that the
    first N tokens of the list sample every domain: a token cap then never drops whole domains."""
    groups: dict[str | None, list[Document]] = {}
    for d in docs:
        groups.setdefault(getattr(d, "domain", None), []).append(d)
    out: list[Document] = []
    queues = list(groups.values())
    for i in range(max((len(q) for q in queues), default=0)):
        out.extend(q[i] for q in queues if i < len(q))
    return out
