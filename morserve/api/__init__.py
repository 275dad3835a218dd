"""The OpenAI-compatible HTTP server (vLLM's schemas, SSE format, error bodies and metric names).

`morserve.api.server.main` is the entry point (`morserve serve`, `server.py`); `create_app` builds
the FastAPI app around an engine factory.
"""
