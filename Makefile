# Front door: `make pipeline` and `make test` set up .venv (once) and run. See README.md.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION := false

.PHONY: setup postgres pipeline test test-fast mlflow-ui clean

setup: $(STAMP)

# constraints.txt pins torch==2.13.0 (the CPU wheel on CPU machines, the CUDA one on GPU machines) so
# that no dependency can pull a newer torch and its CUDA packages.
$(STAMP): pyproject.toml constraints.txt infra/install.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	infra/install.sh $(PY) test   # the same script the images in infra/ run
	touch $(STAMP)

pipeline: setup
	$(PY) pipelines/full.py $(ARGS)

# tests/test_team_mlflow.py runs a real PostgreSQL server: Debian's package, installed where it is missing
# and apt-get can run (as root); elsewhere that one test is skipped, saying how to install it.
postgres:
	@command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } || \
	  echo "PostgreSQL not installed: tests/test_team_mlflow.py will be skipped"

test: setup postgres
	$(PY) -m pytest $(ARGS)

test-fast: setup
	$(PY) -m pytest -m "not e2e" $(ARGS)

mlflow-ui: setup
	-$(VENV)/bin/python -m components.common.tracking relocate runs  # a moved runs/ keeps its artifacts (none yet: no-op)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/runs/mlflow.db --host 127.0.0.1 --port 5000 --workers 1

clean:
	rm -rf runs
