# Quick start:  make demo   (set-up + the Fashion-MNIST demo)   |   make test   (set-up + the whole suite)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.paws-setup-stamp
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
PYTEST_ARGS ?=

.PHONY: setup system-packages demo demo-60pc test lint bench gpu-check clean-venv reproduce-table1 reproduce-table2 reproduce-semppl

# Idempotent: the stamp is rebuilt only when the packaging files change.
setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	@$(MAKE) --no-print-directory system-packages
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt torch torchvision
	$(PIP) install -c constraints.txt -e '.[dev]'
	@$(BIN)/python -c "import torch, torchvision, timm; print('torch', torch.__version__, '| torchvision', torchvision.__version__, '| timm', timm.__version__)"
	@# The ffcv extra builds a C extension against libturbojpeg and OpenCV. Optional: without it setup still
	@# succeeds and data.format=folder works; data.format=ffcv and `paws convert-dataset imagefolder` need it.
	@if $(PIP) install -c constraints.txt -e '.[ffcv]' && $(BIN)/python -c "import ffcv" 2>/dev/null; then \
	    echo "paws: FFCV $$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("ffcv"))') installed (data.format=ffcv available)"; \
	else echo "paws: FFCV NOT installed (it needs the Debian packages $(FFCV_BUILD_PACKAGES), see above);"; \
	     echo "      data.format=folder works without it. Later: $(BIN)/python -m pip install -c constraints.txt -e '.[ffcv]'"; fi
	@touch $(STAMP)

# Debian packages: Fashion-MNIST (the embedded real dataset) and what building the ffcv extra needs. Installed
# with apt-get as root or through sudo; otherwise we say exactly what to run. Never fails: without the FFCV
# build packages, setup goes on without FFCV.
FFCV_BUILD_PACKAGES := pkg-config g++ libturbojpeg0-dev libopencv-dev
system-packages:
	@need=""; \
	[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need="dataset-fashion-mnist"; \
	if ! { command -v g++ >/dev/null && command -v pkg-config >/dev/null && pkg-config --exists libturbojpeg \
	       && { pkg-config --exists opencv4 || pkg-config --exists opencv; }; }; then \
	    need="$$need $(FFCV_BUILD_PACKAGES)"; fi; \
	if [ -z "$$need" ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null; then \
	    echo "paws: not a Debian/Ubuntu system; install the equivalents of:$$need"; exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	else echo "paws: cannot install system packages without root. Run:"; \
	     echo "  sudo apt-get update && sudo apt-get install -y$$need"; \
	     echo "For Fashion-MNIST without root: apt-get download dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*.deb ./data/deb"; \
	     echo "     and pass data.root=./data/deb/usr/share/datasets/fashion-mnist"; exit 0; fi; \
	echo "paws: installing$$need with apt-get"; \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$need >/dev/null \
	    || echo "paws: apt-get could not install$$need; setup goes on (FFCV may be unavailable)"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: setup
	$(BIN)/paws demo --recipe fmnist_demo

demo-60pc: setup
	$(BIN)/paws demo --recipe fmnist_60pc

bench: setup
	$(BIN)/python benchmarks/train_step.py

# Every CUDA path checked in one table (benchmarks/gpu_check.py; at most 8 minutes on one GPU; exits 2 without CUDA).
gpu-check: setup
	$(BIN)/python benchmarks/gpu_check.py

# The paper's Tables 1 and 2 (`paws reproduce`, README "Reproducing Tables 1 and 2"). Resumable: run it again to
# continue. make reproduce-table1 IMAGENET=/path/to/imagenet [DRY_RUN=1] [SCALE=smoke] [LAUNCHER="torchrun ..."]
SCALE ?= full
REPORTS ?= reports
REPRODUCE_ARGS = --scale $(SCALE) --out $(REPORTS) \
	$(if $(and $(IMAGENET),$(filter full,$(SCALE))),--imagenet "$(IMAGENET)") \
	$(if $(filter 1 yes true,$(DRY_RUN)),--dry-run) $(if $(LAUNCHER),--launcher "$(LAUNCHER)") $(REPRODUCE_FLAGS)

reproduce-table1: setup
	$(BIN)/paws reproduce table1 $(REPRODUCE_ARGS)

reproduce-table2: setup
	$(BIN)/paws reproduce table2 $(REPRODUCE_ARGS)

# SemPPL's ImageNet numbers (ResNet-50 fine-tuned at 1% / 10%; the SK rows are shown as not reproducible).
reproduce-semppl: setup
	$(BIN)/paws reproduce semppl $(REPRODUCE_ARGS)

clean-venv:
	rm -rf $(VENV)
