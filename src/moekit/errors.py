"""Errors a user can cause. The CLI prints their message on one line and exits with code 2."""

from __future__ import annotations


class MoekitError(Exception):
    """A user-facing error: bad input, a missing file, an unsupported model."""


class NotAnMoEModel(MoekitError):
    """The model has no Mixture-of-Experts layers moekit can map."""


class UnsupportedArchitecture(MoekitError):
    """The model has MoE layers, but in a layout moekit cannot yet read exactly."""


class TraceError(MoekitError):
    """A routing trace file is missing, corrupted, truncated or does not match the model."""
