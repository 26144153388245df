# `make demo` and `make test` set up everything on a fresh machine, then run.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first, pinned: a CPU wheel of 2.13.0 is what this project is tested with (a looser spec pulls a CUDA build)
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/unguide demo --out demo_out

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) demo_out
