"""Serving: an OpenAI-compatible HTTP API (`server.py`, `protocol.py`, `metrics.py`) over a
continuous-batching engine (`engine.py`), with a chat page (`static/index.html`)."""
