# One-command set-up: `make demo` and `make test` create .venv on first use.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM := false

.PHONY: venv test lint demo bench clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -r requirements.txt
	# The CLIP BPE vocabulary for single-file SDXL (ztsnr_ds/tokenizers.py reads its file by path);
	# --no-deps: open-clip-torch depends on torchvision, which would pull another (CUDA) torch.
	$(PY) -m pip install --quiet --no-deps open-clip-torch==3.3.0
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check .

test: venv lint
	$(PY) -m pytest -q tests

demo: venv
	$(PY) launch/demo.py --out demo_out

clean:
	rm -rf demo_out .pytest_cache
