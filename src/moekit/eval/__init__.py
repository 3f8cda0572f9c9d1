"""Evaluation: token-weighted perplexity per file and domain, a unigram baseline, KL to a reference."""

from moekit.eval.perplexity import document_windows, kl_to_reference, perplexity, unigram_perplexity

__all__ = ["document_windows", "kl_to_reference", "perplexity", "unigram_perplexity"]
