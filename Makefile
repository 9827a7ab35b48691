# Entry points: `make demo`, `make test` (the default tier, the browser test included where Chromium is
# installed) and `make test-all` (every tier: slow and gpu tests too). Each creates/updates .venv itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint bench clean

PIP := $(BIN)/python -m pip install -q --disable-pip-version-check
TORCH := torch==2.13.0
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
# Where torch comes from: auto (PyTorch's CPU wheels when no NVIDIA GPU answers, else the default
# index), cpu, default, or an index URL. The CPU index is an extra index: its 2.13.0+cpu outranks the
# default index's CUDA build, and when it cannot be reached pip carries on with the default index.
TORCH_INDEX ?= auto

# torch first, pinned: any looser spec, or torch pulled in by another package, takes a multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@index="$(TORCH_INDEX)"; \
	if [ "$$index" = auto ]; then \
	  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then index=default; else index=cpu; fi; \
	fi; \
	case "$$index" in \
	  default) echo "torch: default index"; $(PIP) $(TORCH) ;; \
	  cpu) echo "torch: PyTorch's CPU wheels (TORCH_INDEX=default for the default index)"; \
	       $(PIP) --timeout 20 --retries 1 --extra-index-url $(TORCH_CPU_INDEX) $(TORCH) || $(PIP) $(TORCH) ;; \
	  *) echo "torch: $$index"; $(PIP) --extra-index-url "$$index" $(TORCH) ;; \
	esac
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/multiar demo out=outputs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# -m "" replaces the default run's marker filter (pyproject's addopts): every test, slow and gpu too
test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ""

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/python -m pytest -q tests/test_layers.py

bench: $(STAMP)
	$(BIN)/python benchmarks/generate_speed.py
	$(BIN)/python benchmarks/inference_speed.py --json benchmarks/inference_speed.json

clean:
	rm -rf outputs runs .pytest_cache
