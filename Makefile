# The two commands a newcomer needs: `make serve` and `make test`.
# Both create .venv and install everything on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LISTEN ?= 127.0.0.1:50051
PYTEST_ARGS ?=
BUF_DIR := tools/buf
BUF := $(BUF_DIR)/node_modules/.bin/buf

.PHONY: serve test proto lint-proto bench docs clean image lock

$(STAMP): pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]' -e ./clients/python
	touch $(STAMP)

## serve: run the gateway on $(LISTEN) with the embedded local AWS backend (nothing is billed)
serve: $(STAMP)
	$(BIN)/metering-gateway serve --local --listen $(LISTEN)

## test: run every test (and lint the proto when node is installed)
test: $(STAMP) lint-proto
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## lint-proto: Buf's STANDARD lint on protos/ (Buf's CLI from npm, pinned in tools/buf)
lint-proto:
	@if command -v npm >/dev/null 2>&1; then \
		$(MAKE) --no-print-directory --silent $(BUF) && $(BUF) lint && $(BUF) build -o /dev/null && echo "lint-proto: buf lint passed"; \
	else \
		echo "lint-proto skipped: node not found (npm is needed to install @bufbuild/buf)"; \
	fi

$(BUF): $(BUF_DIR)/package.json $(BUF_DIR)/package-lock.json
	npm ci --prefix $(BUF_DIR) --no-audit --no-fund --loglevel=error
	touch $@

## proto: regenerate the Python code from protos/ (never edit it by hand)
proto: $(STAMP)
	$(BIN)/python tools/genproto.py

## bench: the pass-through, RecordUsage (throughput, latency during placement, PostgreSQL vs SQLite) and spool-size benchmarks (figures in README.md)
bench: $(STAMP)
	$(BIN)/python benchmarks/passthrough.py --processes 1 --with-metrics
	$(BIN)/python benchmarks/passthrough.py --processes 2 --with-metrics
	$(BIN)/python benchmarks/record_usage.py
	$(BIN)/python benchmarks/record_usage.py --only spools
	$(BIN)/python benchmarks/spool_days.py

## image: build the container image $(IMAGE) with docker, podman or buildah, whichever works here
## (PYTHON_IMAGE=... picks another Python 3.11 base image, e.g. a local one for offline builds)
IMAGE ?= metering-gateway:dev
PYTHON_IMAGE ?=
image:
	@if docker info >/dev/null 2>&1; then build="docker build"; \
	elif podman info >/dev/null 2>&1; then build="podman build --format docker"; \
	elif buildah info >/dev/null 2>&1; then build="buildah bud --format docker"; \
	else echo "make image: no container builder works here: install docker (with a running engine), podman or buildah" >&2; exit 1; fi; \
	set -x; $$build $(if $(PYTHON_IMAGE),--build-arg PYTHON_IMAGE=$(PYTHON_IMAGE)) -t $(IMAGE) .

## lock: bring requirements/image.lock (the image's exact dependencies, with hashes) in line with pyproject.toml;
## LOCK_ARGS=--upgrade moves every pin to the newest version pyproject.toml allows
LOCK_PYTHON ?= python3.11
LOCK_VENV := build/lock-venv
LOCK_ARGS ?=
lock:
	$(LOCK_PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet pip-tools==7.6.2
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile --quiet --generate-hashes --allow-unsafe \
		--all-build-deps --strip-extras --no-emit-index-url --no-emit-find-links $(LOCK_ARGS) \
		--output-file requirements/image.lock pyproject.toml

clean:
	rm -rf $(VENV) build *.egg-info clients/python/build clients/python/src/*.egg-info $(BUF_DIR)/node_modules clients/node/node_modules

## docs: rewrite the README's settings table from gateway/config.py
docs: $(STAMP)
	$(BIN)/python tools/settings_table.py
