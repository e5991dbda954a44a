# The README's two commands: `make demo` and `make test`. Both build .venv from scratch if needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU torch build lives on disk here; without this pin pip pulls GBs of CUDA wheels.
PIP := $(BIN)/pip install -c constraints.txt
# Kept beside pip's own cache so a warm pip cache also holds the compiled MinkowskiEngine wheel.
WHEEL_CACHE ?= $(HOME)/.cache/pip/rayseg-wheels
ME_GLOB := $(WHEEL_CACHE)/[mM]inkowski[eE]ngine-0.5.4-*.whl
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_DATA_PARQUET_FOOTER_NUM_ACTORS := 2

.PHONY: demo test venv minkowski clean

demo: $(VENV)/.installed
	$(BIN)/rayseg demo

test: $(VENV)/.installed $(VENV)/.minkowski
	$(BIN)/python -m pytest -m "not gpu" tests

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools ninja
	$(PIP) -q -e ".[dev]"
	touch $@

# MinkowskiEngine 0.5.4 has no wheels: compile once (6-8 min on 2 cores), cache the wheel.
minkowski: $(VENV)/.minkowski

$(VENV)/.minkowski: $(VENV)/.installed
	@dpkg -s libopenblas-dev >/dev/null 2>&1 || (apt-get install -y libopenblas-dev || (apt-get update && apt-get install -y libopenblas-dev))
	@mkdir -p $(WHEEL_CACHE)
	ls $(ME_GLOB) >/dev/null 2>&1 || SETUPTOOLS_USE_DISTUTILS=stdlib MAX_JOBS=2 $(BIN)/pip wheel --no-deps \
		--no-build-isolation -c constraints.txt MinkowskiEngine==0.5.4 -w $(WHEEL_CACHE)
	$(PIP) --no-deps $$(ls $(ME_GLOB) | head -n 1)
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info
