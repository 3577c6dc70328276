"""Serving: an OpenAI-compatible HTTP API with a batching engine and a chat page.

- `protocol.py`: request parsing and validation, OpenAI response and error shapes (no torch model).
- `engine.py`: one thread that owns the model and decodes every queued request together
  (continuous batching on a static KV cache).
- `server.py`: the HTTP layer (Starlette on uvicorn: the `[serve]` extra) and `nanovlm serve`:
  API key, cap on requests in progress, graceful drain on SIGTERM.
- `metrics.py`: the Prometheus counters behind `GET /metrics`.
- `static/index.html`: the chat page served at `/`.

Nothing heavy is imported here; `from nanovlm.serve.server import serve, start_server`.
"""
