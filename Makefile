# One entry point for checks; CI (.ci/run) installs, then runs `python -m pytest` like the README.
PY ?= python
.PHONY: install check lint format typecheck test

install:
	$(PY) -m pip install 'torch==2.13.0' && $(PY) -m pip install -e '.[dev]'

format:
	$(PY) -m ruff format src tests bench
	$(PY) -m ruff check --fix src tests bench

lint:
	$(PY) -m ruff format --check src tests bench
	$(PY) -m ruff check src tests bench

typecheck:
	$(PY) -m mypy src

test:
	$(PY) -m pytest

check: lint typecheck test
