# The two commands a fresh machine needs: `make demo` and `make test` (README).
PYTHON ?= python3
VENV := .venv
SLIM := .venv-slim
PYTEST_ARGS ?=

.PHONY: demo test test-fast test-main test-slow test-slim test-pg test-arm arm-userlands lint env slim-env mosquitto postgres chromium clean

demo: env
	$(VENV)/bin/edgefleet demo

# Everything CI runs: lint, fast tests, slow tests, the agent tests under tflite-runtime 2.14,
# the integration and end-to-end tests on PostgreSQL, then the agent on emulated ARM userlands.
test: env slim-env mosquitto postgres chromium lint test-main test-slow test-slim test-pg test-arm

# The everyday loop (< ~10 min on 2 cores).
test-fast: env mosquitto postgres chromium lint test-main

test-main:
	$(VENV)/bin/python -m pytest -m "not slow" $(PYTEST_ARGS)

# Exit code 5 means "no test selected": fine for a marker tier, never for test-main.
test-slow:
	$(VENV)/bin/python -m pytest -m slow $(PYTEST_ARGS) || [ $$? -eq 5 ]

# The integration and end-to-end tests again, every Fleet they open on PostgreSQL (~6 min).
test-pg: env mosquitto postgres chromium
	EDGEFLEET_TEST_ALL_PG=1 $(VENV)/bin/python -m pytest -m "not slow" tests/integration tests/e2e $(PYTEST_ARGS)

# The agent on Debian 12 arm64 and armhf userlands under qemu-user, installed as
# docs/packaging.md says, end to end against `edgefleet up` ("Tested on ARM" there for timings).
# Needs root (chroot, mounts, binfmt_misc); installs qemu-user-static and debootstrap if missing.
# Userlands are cached in ~/.cache/edgefleet/arm (EDGEFLEET_ARM_CACHE), keyed on the requirement
# files and the build script.
test-arm: env mosquitto arm-userlands
	$(VENV)/bin/python -m pytest -m arm tests/arm $(PYTEST_ARGS)

arm-userlands:
	./scripts/arm/build-userland.sh arm64
	./scripts/arm/build-userland.sh armhf

test-slim:
	$(SLIM)/bin/python -m pytest -m "agent and not slow" -p no:cacheprovider $(PYTEST_ARGS) || [ $$? -eq 5 ]

# ruff, then mypy (zero errors; strict on the wire contract, storage and the state machines),
# then the import contracts (layers, one-way imports): docs/architecture.md.
lint: env
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

env: $(VENV)/.installed
slim-env: $(SLIM)/.installed

# The prune extra goes in with --no-deps, tf-keras matched to the installed TF: its declared deps
# would put `tensorflow` on top of tensorflow-cpu and downgrade absl-py (docs/converters.md).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev,onnx]'
	$(VENV)/bin/python -m converters.prune --requirements > $(VENV)/prune-requirements.txt
	$(VENV)/bin/pip install -q --no-deps -r $(VENV)/prune-requirements.txt
	touch $@

$(SLIM)/.installed: pyproject.toml requirements/agent-tflite214.txt requirements/test-slim.txt
	$(PYTHON) -m venv $(SLIM)
	$(SLIM)/bin/pip install -q --upgrade pip
	$(SLIM)/bin/pip install -q -r requirements/agent-tflite214.txt -r requirements/test-slim.txt
	$(SLIM)/bin/pip install -q --no-deps -e .
	touch $@

mosquitto:
	./scripts/ensure-mosquitto.sh

# PostgreSQL on 127.0.0.1:5432 with the role and database the storage tests use (tests/conftest.py).
postgres:
	./scripts/ensure-postgres.sh

# Debian's Chromium for the dashboard tests (tests/e2e/browser.py); Playwright drives it and never
# downloads a browser of its own (no `playwright install`).
chromium:
	@if [ ! -x /usr/bin/chromium ]; then \
	  SUDO=""; [ "$$(id -u)" = "0" ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium; \
	fi

clean:
	rm -rf $(VENV) $(SLIM) .pytest_cache .ruff_cache *.egg-info
