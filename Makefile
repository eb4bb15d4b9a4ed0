# The two commands of the README. Both set up everything on a fresh machine that has
# only Python 3.11, pip and apt: a virtual environment in .venv (created once; later
# runs only check a stamp), pip and setuptools at the locked versions, torch 2.13.0 CPU
# from the wheel already on disk, this package in editable mode with its dev extras at
# the versions of requirements.lock, and Debian's redis-server.
#
# requirements.lock holds the exact versions `make test` was last green with: `make lock`
# re-resolves the newest versions pyproject.toml allows, writes them there, rebuilds
# .venv from them and runs the tests. Commit the lock only if they pass.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tandem-installed
LOCK := requirements.lock
LOCK_VENV := .venv-lock

.PHONY: serve test lint lock redis-server clean

serve: $(STAMP) redis-server
	$(BIN)/tandem serve $(ARGS)

# pytest's own script, not `python -m pytest`: that would put the repository root on
# sys.path, where the folder kernels/ shadows Hugging Face's `kernels` package.
test: $(STAMP) redis-server
	$(BIN)/pytest tests $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check cluster workers router kernels deploy tests bench

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c $(LOCK) pip setuptools
	# torch first, pinned: the CPU build on disk. Left to the resolver, an unpinned
	# torch would pull gigabytes of CUDA packages.
	$(BIN)/pip install --quiet torch==2.13.0
	# No build isolation: the locked setuptools builds the editable install, rather than
	# whatever setuptools is newest.
	$(BIN)/pip install --quiet -c $(LOCK) --no-build-isolation -e '.[dev]'
	touch $(STAMP)

lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet --upgrade pip setuptools
	$(LOCK_VENV)/bin/pip install --quiet torch==2.13.0
	$(LOCK_VENV)/bin/pip install --quiet --no-build-isolation -e '.[dev]'
	{ echo "# The versions \`make test\` passed with (Linux x86_64, Python 3.11, CPU torch)."; \
	  echo "# Written by \`make lock\`; used as pip constraints by the Makefile and tests."; \
	  $(LOCK_VENV)/bin/pip freeze --all --exclude-editable | sort -f; } > $(LOCK)
	rm -rf $(LOCK_VENV) $(VENV)
	$(MAKE) test

redis-server:
	@command -v redis-server >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server >/dev/null; }

clean:
	rm -rf $(VENV) $(LOCK_VENV) build *.egg-info
