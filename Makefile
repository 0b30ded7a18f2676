# Two commands on a fresh machine: `make demo` and `make test`. Both install what they need.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION_DEB_DIR := /usr/share/datasets/fashion-mnist
DATA_STAMP := var/data/.fashion-mnist

.PHONY: install data demo test test-fast tools lint format bench clean

install: $(STAMP) $(DATA_STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# Fashion-MNIST: Debian's package where apt is available, else torchvision's download.
$(DATA_STAMP): | $(STAMP)
	@if [ ! -d $(FASHION_DEB_DIR) ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
		|| echo "apt could not install dataset-fashion-mnist; trying torchvision's download"; \
	fi
	$(PY) -m testbed datasets prepare fashion-mnist
	@mkdir -p $(dir $(DATA_STAMP)) && touch $(DATA_STAMP)

data: $(DATA_STAMP)

demo: install
	$(PY) -m testbed demo

test: install tools
	$(PY) -m pytest

# The quick loop while editing: everything but the tests that train models or start servers.
test-fast: install
	$(PY) -m pytest -m "not slow"

# Debian's tools some tests use: docker-compose checks the compose file (no engine needed),
# chromium and its driver render the dashboard. Installed where apt is (as root), so that a
# newcomer's `make test` skips nothing; elsewhere those tests skip, saying why (CI fails).
tools:
	@missing=""; \
	command -v docker-compose >/dev/null 2>&1 || missing="$$missing docker-compose"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null 2>&1 || missing="$$missing chromium-driver"; \
	if [ -n "$$missing" ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing$$missing"; \
		(apt-get update -qq && apt-get install -y -qq $$missing >/dev/null) \
			|| echo "could not install$$missing: the tests that need them skip (CI fails)"; \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install
	$(PY) -m bench.serve

clean:
	rm -rf var/demo .pytest_cache .ruff_cache
