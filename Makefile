PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev

.PHONY: demo test lint bench bench-flower clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# A real local federation: controller, combiner and 3 clients as processes over TLS.
demo: $(STAMP)
	$(VENV)/bin/scaleout dev -p sample_projects/quickstart/client --clients 3 --rounds 5 --headless --report demo-report.json

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check --select F,E9 src tests benchmarks sample_projects
	$(VENV)/bin/mypy --ignore-missing-imports src/

bench: $(STAMP)
	$(PY) benchmarks/aggregation.py

# Flower's deployment engine beside ours on the round workloads (issue 6). Installs the optional
# bench extra (flwr) into .venv; pip may move some of .venv's shared packages (rich, packaging)
# to versions flwr pins. Not part of bench or test.
$(VENV)/.installed-bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	touch $@

bench-flower: $(VENV)/.installed-bench
	$(PY) benchmarks/flower.py

clean:
	rm -rf $(VENV) .pytest_cache demo-report.json
