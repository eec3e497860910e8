"""What the Model Manager raises; every message is safe to show to the person who asked."""

from __future__ import annotations


class ModelManagerError(Exception):
    """A request the Model Manager cannot serve; the message is safe to show."""


class NotFound(ModelManagerError):
    """No such job, round or checkpoint."""


class Infeasible(ModelManagerError):
    """No round meets the criteria (the message says which threshold is closest)."""


class CheckpointCorrupted(ModelManagerError):
    """A stored checkpoint no longer matches its SHA-256 (disk damage or tampering)."""


class VerificationError(Exception):
    """A downloaded model fails verification; the message says which file and why."""
