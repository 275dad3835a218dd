# The README's two commands. Both install into .venv first if needed (scripts/install.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
ARGS ?=

.PHONY: install serve test

install:
	@bash scripts/install.sh $(VENV)

serve: install
	$(PY) server.py --host $(HOST) --port $(PORT) $(ARGS)

test: install
	$(PY) -m pytest tests $(ARGS)
