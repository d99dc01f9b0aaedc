# qlnas: `make demo` and `make test` do all set-up first (idempotent), then run.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
SYS_PKGS := g++ pkg-config libopencv-dev libturbojpeg0-dev rsync openssh-client openssh-server libjemalloc2
SYS_STAMP := $(VENV)/.sys-ok
TEST_SYS_PKGS := chromium
TEST_SYS_STAMP := $(VENV)/.test-sys-ok
VENV_STAMP := $(VENV)/.deps-ok

.PHONY: setup demo test bench lint clean

setup: $(VENV_STAMP)

# Install the Debian packages in $(1) that are missing (sudo when not root), then touch $@.
define apt_install
@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
if [ -n "$$missing" ]; then \
  if [ "$$(id -u)" -eq 0 ]; then SUDO=""; \
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
  else echo "error: missing system packages:$$missing (run 'apt-get install -y$$missing' as root)" >&2; exit 1; fi; \
  echo "installing system packages:$$missing"; \
  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
fi
@mkdir -p $(VENV) && touch $@
endef

# System packages FFCV and the cluster tests need.
$(SYS_STAMP):
	$(call apt_install,$(SYS_PKGS))

# Test-only system packages: Chromium renders the optuna-dashboard page headless
# (tests/search/test_dashboard.py). `make demo` does not need them.
$(TEST_SYS_STAMP): $(SYS_STAMP)
	$(call apt_install,$(TEST_SYS_PKGS))

$(VENV_STAMP): $(SYS_STAMP) pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1 numpy numba
	$(PIP) install -q -c constraints.txt -e '.[test]'
	$(PIP) install -q -c constraints.txt --no-build-isolation ffcv==1.0.2
	$(BIN)/python -c "import ffcv, qlnas, ray, optuna, timm"
	$(BIN)/python -c "import sys; from qlnas.models.native import main; sys.exit(main())"
	@touch $@

demo: setup
	$(BIN)/qlnas demo

test: setup $(TEST_SYS_STAMP)
	$(BIN)/ruff check qlnas tests bench search.py
	$(BIN)/python -m pytest -q tests

# The speed table (every Table 1 model, resnet50, mobilenetv3; resolution and batch sweep) and
# the loader, writer and loader-memory benchmarks, into bench/results/ (about 25 minutes on 2
# cores).
bench: setup
	$(BIN)/python bench/train_step.py --sweep --label cpu
	$(BIN)/python bench/loader.py --out bench/results
	$(BIN)/python bench/writer.py --out bench/results
	$(BIN)/python bench/loader_memory.py --out bench/results

lint: setup
	$(BIN)/ruff check qlnas tests bench search.py

clean:
	rm -rf $(VENV) build *.egg-info
