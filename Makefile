# `make demo` and `make test` set up everything on a fresh machine, then run.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first, pinned: a CPU wheel of 2.13.0 is what this project is tested with (a looser spec pulls a CUDA build);
# then unguide with every dependency at the exact version CI installs, from constraints.txt.
# Want other versions? Edit constraints.txt (its pins), then `make install` again.
$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/unguide demo --out demo_out

# two workers, one thread each, a test file to one worker (its module fixtures built once)
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n 2 --dist loadfile --durations 15 tests

clean:
	rm -rf $(VENV) demo_out
