#!/usr/bin/env python
"""Train the bundled byte-level BPE tokenizer on the corpus's train split (deterministic).

Byte-level BPE (GPT-2 style pre-tokenisation, no prefix space, no normalisation) so that any UTF-8
text round-trips exactly: decode(encode(x)) == x. One special token, ``<|endoftext|>``, serves as
bos, eos and pad. The result is saved with ``PreTrainedTokenizerFast.save_pretrained`` into
src/moekit/data/tokenizer/, loadable offline with ``AutoTokenizer.from_pretrained``, and carries a
small chat template used by the server.

Usage: python scripts/train_tokenizer.py [--vocab-size 6144] [--out DIR]
Run scripts/build_corpus.py first.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: E402

from moekit.data.corpus import load_corpus  # noqa: E402

EOT = "<|endoftext|>"
VOCAB_SIZE = 6144
# Roles become plain-text markers; each assistant turn ends with <|endoftext|> so generation stops there.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train(vocab_size: int) -> Tokenizer:
    """Train byte-level BPE on the train split's documents, in file order."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [d.text for d in load_corpus("train")]
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def save(tok: Tokenizer, out: Path) -> None:
    """Wrap in PreTrainedTokenizerFast, save in HF format, and check it reloads and round-trips."""
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        pad_token=EOT,
        unk_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        fast.save_pretrained(str(tmp))
        again = AutoTokenizer.from_pretrained(str(tmp), local_files_only=True)
        for doc in load_corpus("validation"):
            ids = again(doc.text, add_special_tokens=False)["input_ids"]
            assert again.decode(ids) == doc.text, f"round trip failed on {doc.doc_id}"
        if out.exists():
            shutil.rmtree(out)
        tmp.chmod(0o755)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    ap.add_argument("--out", type=Path, default=REPO / "src" / "moekit" / "data" / "tokenizer")
    args = ap.parse_args()
    if not 4000 <= args.vocab_size <= 8192:
        raise SystemExit("--vocab-size must be between 4000 and 8192")
    tok = train(args.vocab_size)
    save(tok, args.out)
    print(f"saved {tok.get_vocab_size()}-token tokenizer to {args.out}")
    counts: dict[str, int] = {}
    for doc in load_corpus("train"):
        counts[doc.domain] = counts.get(doc.domain, 0) + len(tok.encode(doc.text).ids)
    for domain, n in sorted(counts.items()):
        print(f"train tokens {domain}: {n:,}")
    print(f"train tokens total: {sum(counts.values()):,}")


if __name__ == "__main__":
    main()
