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

# After the suite: the kernel tests under the other supported triton release(s), in scratch venvs.
test: install
	$(PY) -m pytest tests $(ARGS)
	$(PY) scripts/test_kernels_triton.py
