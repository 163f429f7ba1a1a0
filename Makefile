# One-command entry points; see README.md. Everything installs into .venv here.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: install run test bench clean

install: $(STAMP)

$(STAMP): setup.py pyproject.toml native/fdtx.c native/fdtx.h native/build_native.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

run: install
	$(BIN)/ave-config --create-default
	$(BIN)/ave-broker --status || $(BIN)/ave-broker --start

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/pip install --quiet -r bench/requirements.txt
	$(BIN)/python bench/rpc.py
	$(BIN)/python bench/cmd.py

clean:
	rm -rf $(VENV) build *.egg-info ave/_native*.so
