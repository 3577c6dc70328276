"""Readers for foreign weight formats: one file per format, each a key table plus named transforms."""
