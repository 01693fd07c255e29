# make install: .venv with torch (the CPU build on disk), this package and its test extras.
# make test:    install, then the test suite.
# make demo:    install, then `rsa demo --out out/demo` (the embedded safety task, docs/demo.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PIP := $(PY) -m pip install --disable-pip-version-check -q

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	$(PIP) setuptools wheel ninja pybind11
	$(PIP) --no-build-isolation -e ".[test,train]"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q tests

# make bench: the full benchmark grid (docs/bench.md); `rsa bench --quick` is the short one.
bench: install
	$(VENV)/bin/rsa bench --out out/bench

demo: install
	$(VENV)/bin/rsa demo --out out/demo

clean:
	rm -rf build rsa_kernels/*.so rsa_kernels/_built.json $(STAMP)
