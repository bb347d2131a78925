# Two commands a new user needs: `make fit` and `make test`. Both install into .venv first.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: install fit test lint format bench clean

install: $(STAMP)

# Re-runs only when the package definition or a plugin package changes.
$(STAMP): pyproject.toml plugins/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e '.[test]' -e ./plugins
	touch $(STAMP)

fit: install
	$(VENV)/bin/skipnets fit --config configs/quickstart.yaml

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install
	$(PY) -m benchmarks

# What runs leave in the clone: run folders (checkpoints, predictions, analyses, studies, W&B
# files), `skipnets compare`'s default output, the test cache. Downloaded datasets (data/) stay.
clean:
	rm -rf runs lightning_logs wandb comparisons .pytest_cache
