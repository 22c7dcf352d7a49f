# The two set-up commands of the README: `make quickstart` and `make test`.
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install install-test quickstart test lint

install:
	bash scripts/install.sh

install-test:
	bash scripts/install.sh test,eval

quickstart: install
	$(BIN)/adaptive-m3 quickstart --out runs/quickstart

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install-test lint
	$(BIN)/python -m pytest -q
