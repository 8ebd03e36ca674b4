"""The project's errors, in one place; each message names the file, source or param at fault and what to do."""

from __future__ import annotations

from pathlib import Path


class SourceError(RuntimeError):
    """A source that cannot be read at all; the message says which param switches it off."""


class ModelLoadError(RuntimeError):
    """A model reference or file that does not resolve to a usable, safe model; the message says why."""


class AccessError(RuntimeError):
    """A keys file that cannot be used, or a server that would be open to the network without keys."""


class RegistryError(RuntimeError):
    """A registration that cannot go ahead (inconsistent outputs, a lock held too long); the message says why."""


class ParamError(ValueError):
    """A missing, unknown or invalid entry of params.yaml."""


class ImageReadError(ValueError):
    """An image that cannot be decoded; `reason` is a short machine-readable tag."""

    def __init__(self, path: str | Path, reason: str, detail: str):
        super().__init__(f"{path}: {reason} ({detail})")
        self.path = str(path)
        self.reason = reason
        self.detail = detail


class VolumeTooLarge(ValueError):
    """A volume whose decompressed size passes MAX_VOLUME_BYTES (a gzip bomb, or not a single brain volume)."""


class CompareError(ValueError):
    """Two revisions that cannot be compared pairwise (other images, missing outputs)."""
