# Front door: `make pipeline` and `make test` set up .venv (once) and run. See README.md.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION := false

.PHONY: setup pipeline test test-fast mlflow-ui clean

setup: $(STAMP)

# constraints.txt pins torch==2.13.0 (the CPU wheel on CPU machines, the CUDA one on GPU machines) so
# that no dependency can pull a newer torch and its CUDA packages.
$(STAMP): pyproject.toml constraints.txt infra/install.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	infra/install.sh $(PY) test   # the same script the images in infra/ run
	touch $(STAMP)

pipeline: setup
	$(PY) pipelines/full.py $(ARGS)

test: setup
	$(PY) -m pytest $(ARGS)

test-fast: setup
	$(PY) -m pytest -m "not e2e" $(ARGS)

mlflow-ui: setup
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/runs/mlflow.db --host 127.0.0.1 --port 5000 --workers 1

clean:
	rm -rf runs
