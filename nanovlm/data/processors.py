"""Processors: the tokenizer and the image processor."""

from nanovlm.data.tokenizer import get_tokenizer  # noqa: F401
