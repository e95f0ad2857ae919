# edgefleet developer entry points. `make test` is what CI runs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test test-fast lint demo bench clean

setup: $(STAMP)
	@command -v mosquitto >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto; \
	  else echo "mosquitto is missing: install it (apt-get install mosquitto)" >&2; exit 1; fi; }

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	# torch first, pinned: the CPU wheel; anything unpinned would pull a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# constraints.txt: versions known to resolve together (see its header)
	$(PY) -m pip install -q -c constraints.txt -e '.[edge,trainer,fl,dev]'
	@touch $(STAMP)

test: setup
	$(PY) -m pytest -q -ra

test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy shared edge_agent trainer

demo: setup
	$(VENV)/bin/edgefleet demo

bench: setup
	@for script in benchmarks/bench_*.py; do echo "== $$script"; $(PY) $$script || exit $$?; done

clean:
	rm -rf .edgefleet .edgefleet-demo .pytest_cache build *.egg-info
