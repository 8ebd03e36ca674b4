"""Brain-tumor MRI classifier pipeline: fetch, deduplicate, split, train, evaluate, register."""

__version__ = "0.1.0"
