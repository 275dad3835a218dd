"""Serve a model over the OpenAI-compatible HTTP API: `python server.py --model ... --port 8000`
(the same as `morserve serve`; see morserve/api/server.py for the flags)."""

import sys

from morserve.api.server import main

if __name__ == "__main__":
    sys.exit(main())
