PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev

.PHONY: demo test test-postgresql chaos lint bench bench-flower dist dist-check clean image

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

# Issue 18: the integration suite's admin flow with every controller on PostgreSQL (a server the
# tests start from Debian's postgresql binaries; a fresh database per federation). Tests of
# SQLite's own files (state.db, models/ on a full disk) skip themselves and say why.
PG_SUITE := $(addprefix tests/integration/test_,$(addsuffix .py,cli session audit commands api http_api registry identity \
	recovery round_records strategies every_aggregator server_functions secrets stored_files package_update disk))
test-postgresql: $(STAMP)
	SCALEOUT_TEST_STORE=postgresql $(PY) -m pytest -rs $(PG_SUITE)

# Issue 14's chaos suite, whole: each role killed (SIGKILL, then restarted) or paused (SIGSTOP
# for 15 s) while clients train and while they validate; prints scenario, outcome, recovery time.
chaos: $(STAMP)
	rm -f chaos-report.jsonl
	CHAOS_FULL=1 CHAOS_REPORT=$(CURDIR)/chaos-report.jsonl $(PY) -m pytest tests/chaos -p no:cacheprovider; \
	  status=$$?; $(PY) tests/chaos/report.py chaos-report.jsonl; exit $$status

lint: $(STAMP)
	$(VENV)/bin/ruff check --select F,E9 src tests benchmarks sample_projects
	$(VENV)/bin/mypy --ignore-missing-imports src/

# Issue 6's benchmarks: each prints one JSON object as its last line (figures, the baseline
# measured in the same run, the ratio). Minutes, and several GB for the 1 GB transfer.
bench: $(STAMP)
	$(PY) benchmarks/aggregate.py
	$(PY) benchmarks/transfer.py --mib 64
	$(PY) benchmarks/transfer.py --roles --mib 100
	$(PY) benchmarks/transfer.py --roles --mib 1000 --repeat 2
	$(PY) benchmarks/round.py --scenario all
	$(PY) benchmarks/scale.py

# Flower side by side (benchmarks/flower.py), in its own venv: flwr pins versions of packages
# .venv shares (rich, packaging), so it never touches the venv make test uses.
BENCH_VENV := .venv-bench
$(BENCH_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install --quiet -e '.[bench]'
	touch $(BENCH_VENV)/.installed

bench-flower: $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/python benchmarks/flower.py

# One file to download (issue 7): dist/scaleout.pyz (shiv zipapp, needs a python3 of the build's
# minor version) and dist/scaleout (PyInstaller one-file, needs no Python). The build tools live
# in their own venv so make test never installs them.
DIST_VENV := .venv-dist
$(DIST_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(DIST_VENV)
	$(DIST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(DIST_VENV)/bin/python -m pip install --quiet -e '.[dist]'
	touch $(DIST_VENV)/.installed

dist: $(DIST_VENV)/.installed
	build/zipapp.sh $(DIST_VENV)/bin/python
	build/frozen.sh $(DIST_VENV)/bin/python

# Both artefacts in a clean environment (env -i, a fresh HOME, no venv on PATH): --version, a
# dev federation with each, a session whose roles are different artefacts, a missing module.
dist-check: dist
	build/dist_check.sh $(DIST_VENV)/bin/python

# Issue 18's container image (Dockerfile): one image for every role, run as uid 10001.
# IMAGE=registry.example.org/scaleout:TAG to name it for a push; ENGINE=podman to pick one.
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= scaleout:$(VERSION)
ENGINE ?=

image:
	@engine="$(ENGINE)"; found=""; why=""; \
	if [ -z "$$engine" ]; then \
	  for e in docker podman; do \
	    command -v $$e >/dev/null 2>&1 || continue; found="$$found $$e"; \
	    if out=$$($$e info 2>&1 >/dev/null); then engine=$$e; break; fi; \
	    why="$$why; $$e info: $$(printf '%s' "$$out" | grep -v '^ *$$' | tail -n 1)"; \
	  done; \
	fi; \
	if [ -z "$$engine" ]; then \
	  if [ -z "$$found" ]; then echo "make image: no container engine here: install docker or podman (or pass ENGINE=...)" >&2; \
	  else echo "make image: no container engine runs here (found:$$found$$why): start the docker daemon or podman, then run make image again" >&2; fi; \
	  exit 1; \
	fi; \
	echo "$$engine build -t $(IMAGE) ."; \
	$$engine build -t $(IMAGE) .

clean:
	rm -rf $(VENV) $(BENCH_VENV) $(DIST_VENV) .pytest_cache demo-report.json chaos-report.jsonl dist build/zipapp-out build/frozen-work
