# Entry points; README.md names `make test` (every test) and `make bench` (every benchmark).
PYTHON ?= python3

.PHONY: test test-python test-go test-web bench lint

test: test-python

test-python:
	$(PYTHON) -m pip install --quiet -e '.[dev]'
	$(PYTHON) -m pytest

lint:
	$(PYTHON) -m ruff check protocol gateway tests bench
	$(PYTHON) -m ruff format --check protocol gateway tests bench
	$(PYTHON) -m mypy

bench:
	$(PYTHON) -m pip install --quiet -e '.[bench]'
	$(PYTHON) bench/run.py
