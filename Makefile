# Fresh machine with Python 3.11: `make demo` and `make test` set everything up themselves.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
DEVICE_VENV := .venv-device
OLD_DEVICE_VENV := .venv-device-ort120
HOST_STAMP := $(VENV)/.installed
DEVICE_STAMP := $(DEVICE_VENV)/.installed
OLD_DEVICE_STAMP := $(OLD_DEVICE_VENV)/.installed
PIP_FLAGS := --quiet --disable-pip-version-check

.PHONY: demo test test-arm64 lint format clean venv device-venv old-device-venv

venv: $(HOST_STAMP)
device-venv: $(DEVICE_STAMP)
old-device-venv: $(OLD_DEVICE_STAMP)

# Host environment: torch, transformers, peft, optimum, onnx, the onnxruntime training build (it
# builds gradient graphs and runs every graph the device runs) + dev tools.
$(HOST_STAMP): setup.cfg pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) -e ".[host,dev]"
	@touch $@

# Device environment: the `device` extra (the newest plain onnxruntime), plus onnxruntime-genai as
# a test client (the `genai` extra: no torch either). The tests run edgeft here to prove the device
# side needs neither torch nor the training build.
$(DEVICE_STAMP): setup.cfg pyproject.toml
	$(PY) -m venv $(DEVICE_VENV)
	$(DEVICE_VENV)/bin/pip install $(PIP_FLAGS) -e ".[device,genai]"
	@touch $@

# The oldest onnxruntime the device supports: the tests compare it with the newest.
$(OLD_DEVICE_STAMP): setup.cfg pyproject.toml
	$(PY) -m venv $(OLD_DEVICE_VENV)
	$(OLD_DEVICE_VENV)/bin/pip install $(PIP_FLAGS) -e ".[device]" "onnxruntime==1.20.*"
	@touch $@

demo: $(HOST_STAMP)
	@PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash examples/quickstart.sh

test: $(HOST_STAMP) $(DEVICE_STAMP) $(OLD_DEVICE_STAMP)
	EDGEFT_DEVICE_VENV="$(CURDIR)/$(DEVICE_VENV)" EDGEFT_OLD_DEVICE_VENV="$(CURDIR)/$(OLD_DEVICE_VENV)" \
		$(VENV)/bin/python -m pytest -q

# Linux aarch64 under qemu-user (needs root): a Debian arm64 root built once in /var/cache/edgeft
# (EDGEFT_ARM64_ROOT) trains, evaluates and generates; compared with .venv-device. tests/arm64/run.py
test-arm64: $(HOST_STAMP) $(DEVICE_STAMP)
	EDGEFT_DEVICE_VENV="$(CURDIR)/$(DEVICE_VENV)" $(VENV)/bin/python tests/arm64/run.py

lint: $(HOST_STAMP)
	$(VENV)/bin/ruff check edgeft tests examples
	$(VENV)/bin/ruff format --check edgeft tests examples

format: $(HOST_STAMP)
	$(VENV)/bin/ruff format edgeft tests examples
	$(VENV)/bin/ruff check --fix edgeft tests examples

clean:
	rm -rf $(VENV) $(DEVICE_VENV) $(OLD_DEVICE_VENV) demo-out .pytest_cache

# Benchmarks against torch + PEFT, transformers generate and onnxruntime-genai (benchmarks/RESULTS.md;
# genai_decode.py runs onnxruntime-genai in the device venv).
.PHONY: bench bench-quick
bench: $(HOST_STAMP) $(DEVICE_STAMP)
	$(VENV)/bin/python benchmarks/ab.py
	$(VENV)/bin/python benchmarks/bench.py
	EDGEFT_DEVICE_VENV="$(CURDIR)/$(DEVICE_VENV)" $(VENV)/bin/python benchmarks/genai_decode.py

bench-quick: $(HOST_STAMP)
	$(VENV)/bin/python benchmarks/bench.py --quick
