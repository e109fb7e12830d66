# Two commands for users and CI (see README.md):
#   make demo   - create/reuse .venv, install sparseflow, run `sparseflow demo`
#   make test   - create/reuse .venv, install sparseflow with test extras, run every check CI runs
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sparseflow-installed
# torch before the project: this pins the CPU wheel, otherwise pip may resolve a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: demo test install
install: $(STAMP)

$(STAMP): pyproject.toml CMakeLists.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" cmake ninja
	# no build isolation: the editable install rebuilds the C++ extension on import when csrc/ changes
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sparseflow demo

test: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" bash .ci/checks.sh
