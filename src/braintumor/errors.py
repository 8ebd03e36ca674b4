"""Errors that stop a stage; each message names the file, source or param at fault and what to do."""


class SourceError(RuntimeError):
    """A source that cannot be read at all; the message says which param switches it off."""


class ModelLoadError(RuntimeError):
    """A model reference or file that does not resolve to a usable, safe model; the message says why."""


class RegistryError(RuntimeError):
    """A registration that cannot go ahead (inconsistent outputs, a lock held too long); the message says why."""
