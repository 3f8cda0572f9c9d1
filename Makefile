# Two commands: `make demo` and `make test`. Both create .venv and install everything the project needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0   # the CPU wheel; an unpinned torch would pull a multi-GB CUDA build

.PHONY: demo test venv dev lint clean system-deps

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_PIN)"

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH_PIN)" -e .
	touch $@

$(VENV)/.installed-dev: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH_PIN)" -e ".[dev]"
	touch $@

venv: $(VENV)/.installed
dev: $(VENV)/.installed-dev

# Headless Chromium for the report test (Debian package; needs root, skipped quietly when already present).
system-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = "0" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium not found: install the Debian package 'chromium' for the report test"; fi; }

demo: venv
	$(BIN)/moekit demo

test: dev system-deps
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/python -m pytest

lint: dev
	$(BIN)/ruff check src tests bench scripts

clean:
	rm -rf $(VENV) build dist .pytest_cache .ruff_cache
