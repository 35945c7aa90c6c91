# Two set-up commands for a fresh machine: `make demo` and `make test`.
# Each installs what it needs (Debian packages, .venv, Python packages) and is a
# quick no-op for what is already installed.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
APT_PKGS := fonts-noto-color-emoji fonts-symbola wordnet-base wordnet-sense-index
# only for `make test`: the web app's browser test drives a real chromium with selenium
TEST_APT_PKGS := chromium chromium-driver

.PHONY: demo test sysdeps sysdeps-test venv bench clean

# apt-get install what is missing of $(1) (with sudo only when not root)
define apt_install
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
endef

sysdeps:
	$(call apt_install,$(APT_PKGS))

sysdeps-test:
	$(call apt_install,$(TEST_APT_PKGS))

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# the tests also need the web app's extra (gradio); `make demo` does not
$(VENV)/.installed-app: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test,app]'
	touch $@

venv: sysdeps $(VENV)/.installed

demo: venv
	$(BIN)/anyclass demo --out runs/demo

test: venv sysdeps-test $(VENV)/.installed-app
	$(BIN)/python -m pytest -q

bench: venv
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs
