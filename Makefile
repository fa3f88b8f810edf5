# Everything a fresh machine needs: `make serve` runs the server, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision wheels; override for other platforms (e.g. a CPU-only index).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STORE ?= ./store
STAMP := $(VENV)/.installed

.PHONY: install serve test lint typecheck protos check-protos bench mutants clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[server,dev]' -e examples/custom_architecture
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/modelhost serve --store $(STORE)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest

protos: $(STAMP)
	PYTHON=$(BIN)/python scripts/gen_protos.sh

bench: $(STAMP)
	$(BIN)/python bench/options.py
	$(BIN)/python bench/load.py
	$(BIN)/python bench/upload.py
	$(BIN)/python bench/predict.py

# Not part of `test`: puts plausible bugs into a copy of the server, one at a time.
mutants: $(STAMP)
	$(BIN)/python bench/mutants.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
