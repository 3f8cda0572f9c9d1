"""Evaluation: token-weighted perplexity per file and domain, a unigram baseline, KL to a reference."""

from moekit.data.batching import document_windows  # perplexity's windows (overlap 1), re-exported
from moekit.eval.perplexity import (
    WindowLosses,
    aggregate_windows,
    kl_to_reference,
    perplexity,
    unigram_perplexity,
    window_losses,
)

__all__ = ["WindowLosses", "aggregate_windows", "document_windows", "kl_to_reference", "perplexity",
           "unigram_perplexity", "window_losses"]
