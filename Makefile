# EdgeRLHF — the two commands of the README, and the steps they need.
#   make run    set up (if needed) and start backend + worker + dashboard (Ctrl-C stops all three)
#   make test   set up (if needed) and run the whole test suite

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: run test setup browser postgres clean

run: setup
	$(BIN)/edgerlhf up

# Two workers (pytest-xdist); a module's tests stay on one worker (its fixtures are built once) and the longest
# modules start first (tests/conftest.py). Not in addopts: `pytest -m gpu tests/gpu` runs without it.
test: setup browser postgres
	$(BIN)/python -m pytest -n 2 --dist loadfile --durations=25

setup: $(STAMP)

# Reinstall only when the dependency lists change. constraints.txt pins every package (torch==2.13.0
# included: an unpinned torch would pull several GB of CUDA wheels on a CPU machine).
$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "EdgeRLHF needs Python 3.11+; set PYTHON=python3.11")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# The dashboard's end-to-end test drives Debian's Chromium (browsers cannot be downloaded here).
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's chromium for the browser test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "note: /usr/bin/chromium missing and cannot be installed; the browser test will be skipped"; fi

# Every database test runs on SQLite and on PostgreSQL: the tests start a throw-away server from Debian's
# server binaries (tests/support/postgres.py). Installed without the default cluster: nothing starts at boot.
postgres:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's postgresql for the PostgreSQL tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-common >/dev/null && \
		sed -i 's/^#* *create_main_cluster *=.*/create_main_cluster = false/' /etc/postgresql-common/createcluster.conf && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	else echo "note: no PostgreSQL server binaries and they cannot be installed; the PostgreSQL tests will be" \
		"skipped (and fail under CI=true)"; fi

clean:
	rm -rf $(VENV) edgerlhf-data .pytest_cache
