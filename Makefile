# fedsky: the two set-up commands are `make demo` and `make test` (see README.md).
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1

.PHONY: install demo demo-hosts test lint typecheck bench artifacts packages clean

# Installs what is missing (apt packages, .venv, torch, fedsky). Serialised with flock so that
# parallel invocations never run two pip installs into the same venv.
install:
	@flock /tmp/fedsky-install.lock bash scripts/bootstrap.sh

demo: install
	$(PY) -m fedsky.controller.demo $(DEMO_ARGS)

# The same case study with every part on a host of its own (network namespaces; needs root):
# the controller, each hospital's agent and VMs, and the aggregator booted in the region
# placement picks by its own start-up script. Says which host did what (docs/testbed.md).
demo-hosts: install
	$(PY) -m benchmarks.testbed --demo $(DEMO_ARGS)

# The tests also need a browser for the dashboard's (Debian's chromium, driven by Playwright).
test:
	@flock /tmp/fedsky-install.lock bash scripts/bootstrap.sh --browser
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy --strict -p fedsky.controller -p fedsky.agent -p fedsky.shared

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	$(VENV)/bin/mypy --strict -p fedsky.controller -p fedsky.agent -p fedsky.shared

bench: install
	$(PY) -m benchmarks.placement
	$(PY) -m benchmarks.orchestrator
	$(PY) -m benchmarks.control_plane
	$(PY) -m benchmarks.fl_overhead
	# The case study on the testbed (root; about 15 minutes): predicted against measured.
	$(PY) -m benchmarks.testbed --case-study

# The pinned release artifacts: dist/wheelhouse/ (wheels of fedsky and every dependency per
# role, requirements-<role>.txt with --hash lines, manifest.json). ROLES="aggregator" limits it.
artifacts: install
	$(PY) scripts/build_artifacts.py $(foreach r,$(ROLES),--role $(r))

# Debian packages (fedsky-agent, -controller, -client, -aggregator) from the wheelhouse, into
# dist/; `make packages VERSION=x.y.z` sets their version (default: pyproject.toml's).
packages: artifacts
	$(PY) packaging/build_debs.py $(if $(VERSION),--version $(VERSION))

clean:
	rm -rf build *.egg-info .mypy_cache .ruff_cache
