"""Errors that stop a stage; each message names the file, source or param at fault and what to do."""


class SourceError(RuntimeError):
    """A source that cannot be read at all; the message says which param switches it off."""
