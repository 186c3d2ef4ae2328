# Entry points. README.md names `make test` (every test, on a fresh machine) and `make bench`.
PYTHON ?= python3

.PHONY: test deps test-python test-go test-web check-webui webui lint bench

# Every test: Python (protocol, gateway, SDK, CLI), Go SDK, TypeScript SDK + browser tests.
test: deps test-python test-go test-web

# What the tests need: Python packages, npm packages, and Debian's chromium for the browser
# tests (npm cannot download a browser here; installed with apt-get when missing and root).
deps:
	$(PYTHON) -m pip install --quiet -e '.[dev]'
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium is missing: sudo apt-get install chromium" >&2; exit 1; fi; }
	cd web-demo && npm ci --no-audit --no-fund

test-python:
	$(PYTHON) -m pytest

test-go:
	cd go && go vet ./... && go test -race ./...

# The pages are built first: the browser tests load them from the gateway.
test-web: webui
	cd web-demo && npm test

webui:
	cd web-demo && npm run build

# CI: the committed build (served by `muxgate serve` without Node) is what the sources build.
check-webui: webui
	git diff --exit-code -- gateway/webui
	@test -z "$$(git status --porcelain -- gateway/webui)" || \
	  { git status --porcelain -- gateway/webui; echo "gateway/webui is stale: commit the build" >&2; exit 1; }

lint:
	$(PYTHON) -m ruff check protocol gateway tests bench
	$(PYTHON) -m ruff format --check protocol gateway tests bench
	$(PYTHON) -m mypy
	cd go && test -z "$$(gofmt -l .)"

bench:
	$(PYTHON) -m pip install --quiet -e '.[bench]'
	$(PYTHON) bench/run.py
