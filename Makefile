# Every target installs what it needs into a virtual environment first. `make demo` and
# `make test` install the exact versions of constraints.txt (the lock: what the suite passed
# on); torch is pinned to the CPU build on this machine's disk. `make test-latest` tries the
# newest releases pyproject.toml allows, `make lock` does that and rewrites the lock when the
# suite passes, `make test-oldest` runs the smoke tests on the oldest declared releases.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := constraints.txt
OLDEST := constraints-oldest.txt
TORCH := torch==2.13.0
# Constraints reach pip's isolated build environments only through the environment.
PIP_ENV := PIP_CONSTRAINT=$(CURDIR)/$(LOCK) PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: install demo test test-slow test-oldest test-latest lock lint bench

$(STAMP): pyproject.toml $(LOCK)
	rm -rf $(VENV)
	$(PY) -m venv $(VENV)
	$(PIP_ENV) $(BIN)/python -m pip install -q "pip==$$(sed -n 's/^pip==//p' $(LOCK))"
	$(PIP_ENV) $(BIN)/python -m pip install -q $(TORCH)
	$(PIP_ENV) $(BIN)/python -m pip install -q -e '.[eval,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/modformer demo

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

# The oldest transformers/tokenizers pyproject.toml declares, everything else from the lock.
.venv-oldest/.installed: pyproject.toml $(LOCK) $(OLDEST)
	rm -rf .venv-oldest
	$(PY) -m venv .venv-oldest
	grep -v -E '^(transformers|tokenizers|huggingface[-_]hub)==' $(LOCK) > .venv-oldest/constraints.txt
	cat $(OLDEST) >> .venv-oldest/constraints.txt
	PIP_CONSTRAINT=$(CURDIR)/.venv-oldest/constraints.txt PIP_DISABLE_PIP_VERSION_CHECK=1 \
	  .venv-oldest/bin/python -m pip install -q $(TORCH) -e '.[dev]'
	touch $@

test-oldest: .venv-oldest/.installed
	.venv-oldest/bin/python -c 'import transformers, tokenizers; print("oldest: transformers", transformers.__version__, "tokenizers", tokenizers.__version__)'
	.venv-oldest/bin/python -m pytest -q -p no:cacheprovider tests/test_smoke.py

# The newest releases pyproject.toml allows (torch stays pinned), in a venv of their own.
test-latest:
	rm -rf .venv-latest
	$(PY) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip
	.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager $(TORCH) -e '.[eval,dev]'
	.venv-latest/bin/python -m pip list 2>/dev/null | grep -i -E '^(transformers|tokenizers|safetensors|lm.eval) '
	.venv-latest/bin/python -m pytest -q

# Refresh the lock: the newest allowed releases, kept only if the whole suite passes on them.
lock: test-latest
	{ echo "# The lock: exact versions the test suite passed on (make lock rewrites it)."; \
	  .venv-latest/bin/python -m pip freeze --all --exclude-editable \
	    | grep -v -E '^(-e |modformer)' | sed -E 's/^torch==([0-9.]+)\+cpu$$/torch==\1/'; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	@echo "wrote $(LOCK); commit it"

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

bench: install
	$(BIN)/python bench/train_throughput.py
