# The two commands of the README. Both set up everything on a fresh machine that has
# only Python 3.11, pip and apt: a virtual environment in .venv (created once; later
# runs only check a stamp), torch 2.13.0 CPU from the wheel already on disk, this
# package in editable mode with its dev extras, and Debian's redis-server.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tandem-installed

.PHONY: serve test lint redis-server clean

serve: $(STAMP) redis-server
	$(BIN)/tandem serve $(ARGS)

test: $(STAMP) redis-server
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check cluster workers router kernels tests bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: the CPU build on disk. Left to the resolver, an unpinned
	# torch would pull gigabytes of CUDA packages.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

redis-server:
	@command -v redis-server >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server >/dev/null; }

clean:
	rm -rf $(VENV) build *.egg-info
