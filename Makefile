# Two commands: `make demo` and `make test`. Both create .venv when it is missing.
# `make test-gpu` runs the CUDA suite (tests/gpu; docs/gpu.md); GPU_PY=python3 uses a python
# that already has a CUDA torch instead of the venv.
# torch is pinned here; override with e.g. `make test TORCH_SPEC="torch==2.5.1"`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.6.0
PY := $(VENV)/bin/python
GPU_PY ?= $(PY)
STAMP := $(VENV)/.installed

.PHONY: demo test test-gpu install clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	# the optional integrations (transformers, lightning, tensorboard) are installed so their tests
	# run; the constraint keeps pip from replacing the pinned torch. timm comes without its
	# dependencies: PyPI's torchvision does not load beside the CPU torch wheel (and breaks
	# `import transformers`), so the timm tests import timm over a stand-in (tests/stubs)
	echo "$(TORCH_SPEC)" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt -e ".[test,integrations]"
	$(PY) -m pip install -q --no-deps "timm>=1.0"
	# Triton (CUDA builds of torch bring it), so that tests/test_triton_isolated.py checks
	# SparseLinear's CUDA kernels under Triton's interpreter on the CPU, in a process of its own:
	# installed beside site-packages, not in it, so the other tests never load it
	$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/triton "$(TRITON_SPEC)"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m regrow demo

test: $(STAMP)
	$(PY) -m pytest -q

test-gpu: $(if $(filter $(PY),$(GPU_PY)),$(STAMP))
	$(GPU_PY) -m pytest -q -m gpu tests/gpu

clean:
	rm -rf $(VENV) build *.egg-info runs
