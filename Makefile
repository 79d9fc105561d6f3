# Every target creates .venv when it is missing; re-running is a no-op for the install.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is pinned here (a CPU build lies on the dev machines); pyproject keeps a range.
TORCH_PIN := torch==2.13.0

.PHONY: install test test-slow audit lint bench demo clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[dev,onnx]' $(TORCH_PIN)
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

audit: $(STAMP)
	LIPCERT=$(BIN)/lipcert bash benchmarks/audit.sh

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(BIN)/lipcert bench layers

demo: $(STAMP)
	$(BIN)/lipcert demo

clean:
	rm -rf $(VENV) runs build *.egg-info
