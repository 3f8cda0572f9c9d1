# Two commands: `make demo` and `make test`. Both create .venv and install, from the lock file of tested
# versions (requirements/lock.txt), everything the project needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := requirements/lock.txt
LOWEST := requirements/lowest.txt
# The CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
# `make lock` / `make lock-lowest`: how the lock files are made (uv resolves; the torch CPU wheel lies in /opt/wheels).
UV_COMPILE = uv pip compile pyproject.toml --extra dev --python-version 3.11 --find-links /opt/wheels \
	-c requirements/torch-cpu.txt

.PHONY: demo test test-fast test-latest test-lowest venv dev lint lock lock-lowest clean system-deps

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml $(LOCK)
	$(BIN)/pip install -q -c $(LOCK) "$(TORCH_PIN)" -e .
	touch $@

$(VENV)/.installed-dev: $(BIN)/python pyproject.toml $(LOCK)
	$(BIN)/pip install -q -c $(LOCK) "$(TORCH_PIN)" -e ".[dev]"
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
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

# The suite without the tests marked slow: under 3 minutes on a quiet 2-core machine (159 s of CPU, subprocesses
# included, when measured). A test over ~20 s gets @pytest.mark.slow; `make test` runs everything.
test-fast: dev
	$(BIN)/python -m pytest -m "not slow"

# The newest versions pyproject.toml allows (torch stays on the local CPU build), in a separate venv:
# run it before refreshing the lock, and whenever transformers ships.
test-latest: system-deps
	$(PY) -m venv .venv-latest
	.venv-latest/bin/pip install -q --upgrade pip
	.venv-latest/bin/pip install -q --upgrade --upgrade-strategy eager "$(TORCH_PIN)" -e ".[dev]"
	.venv-latest/bin/pip list 2>/dev/null | grep -iE "^(transformers|torch|peft|tokenizers|safetensors|numpy) "
	.venv-latest/bin/python -m pytest

# The oldest versions pyproject.toml declares (requirements/lowest.txt), in a separate venv: the lower bounds
# in pyproject.toml are honest only while this passes.
test-lowest:
	$(PY) -m venv .venv-lowest
	.venv-lowest/bin/pip install -q --upgrade pip
	.venv-lowest/bin/pip install -q -c $(LOWEST) "$(TORCH_PIN)" -e ".[dev]"
	.venv-lowest/bin/python -m pytest -p no:cacheprovider

lock: dev
	$(BIN)/$(UV_COMPILE) --upgrade -o $(LOCK)

lock-lowest: dev
	$(BIN)/$(UV_COMPILE) --resolution lowest-direct -o $(LOWEST)

lint: dev
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .venv-latest .venv-lowest build dist .pytest_cache .ruff_cache
