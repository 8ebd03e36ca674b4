"""Data stages: fetch the sources, read images and volumes, deduplicate, split. They know no model."""
