"""Bundled data: the multi-domain corpus (``moekit:corpus``), its tokenizer, and synthetic generators."""

from moekit.data.corpus import (
    CORPUS_SPEC,
    CORPUS_SPEC_HELP,
    SPLITS,
    CorpusSpec,
    Document,
    corpus_documents,
    corpus_meta,
    corpus_path,
    domains,
    load_corpus,
    load_tokenizer,
    parse_corpus_spec,
    read_documents,
    tokenizer_path,
)

__all__ = [
    "CORPUS_SPEC",
    "CORPUS_SPEC_HELP",
    "SPLITS",
    "CorpusSpec",
    "Document",
    "corpus_documents",
    "corpus_meta",
    "corpus_path",
    "domains",
    "load_corpus",
    "load_tokenizer",
    "parse_corpus_spec",
    "read_documents",
    "tokenizer_path",
]
