# The README's two commands: `make demo` (export the trained built-in shapes model and answer questions
# about generated scenes, then the random-weight tiny model on a real photo)
# and `make test`. Each creates .venv if missing and installs the CPU build of torch before
# anything that depends on it (an unpinned torch requirement would pull the CUDA build).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
# On a machine without a local CPU wheel, e.g.: make demo TORCH_PIP_FLAGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_FLAGS ?=
PHOTO = $$($(BIN)/python -c 'import matplotlib.cbook as c; print(c.get_sample_data("grace_hopper.jpg", asfileobj=False))')

.PHONY: demo test install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PIP_FLAGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test,sign]"
	$(MAKE) --no-print-directory triton
	$(MAKE) --no-print-directory tensorrt-rtx
	touch $@

# Triton Inference Server for `himap-trt triton serve` and its tests: the tritonserver binary and
# Python backend bundled in the nvidia-pytriton wheel, without its dependencies (it pins numpy<2 for
# client code we do not use), and numpy<2 in a directory of its own for the backend's stub process
# (the 2.51 stub speaks numpy 1.x's C ABI; see himap_trt/triton/environment.py). `make install TRITON=0`
# skips both (the Triton tests then skip, naming what is missing).
TRITON ?= 1
.PHONY: triton
triton:
ifeq ($(TRITON),1)
	$(BIN)/python -m pip install --quiet --no-deps "nvidia-pytriton==0.7.0"
	$(BIN)/python -m pip install --quiet --no-deps --upgrade --target $(VENV)/triton-stub-numpy "numpy<2"
endif

# TensorRT-RTX (module `tensorrt_rtx`): its ONNX parser and builder run on a machine without a GPU
# and build engines ahead of time for chosen compute capabilities, so CI builds every exported graph
# with a real TensorRT (tests/integration/test_tensorrt_rtx_build.py). The metapackage pulls the
# ~95 MB libs wheel and the bindings; no CUDA packages. `make install TRT_RTX=0` skips it (the tests
# that need it then skip, naming what is missing). Same version as the `tensorrt-rtx` extra.
TRT_RTX ?= 1
TRT_RTX_SPEC ?= tensorrt-rtx-cu13==1.7.1.116
.PHONY: tensorrt-rtx
tensorrt-rtx:
ifeq ($(TRT_RTX),1)
	$(BIN)/python -m pip install --quiet "$(TRT_RTX_SPEC)"
endif

# The main job: the trained built-in `shapes` model, HiMAP (K1=2, K2=8), answering questions about
# generated scenes; then the random-weight `tiny` on a real photo (the check of the photo path).
demo: $(VENV)/.installed
	$(BIN)/himap-trt export --model shapes --out export
	$(BIN)/python -m himap_trt.data.shapes --out demo-scenes --n 4 --seed 1
	$(BIN)/himap-trt run --batch demo-scenes/questions.jsonl --export-dir export
	$(BIN)/himap-trt export --model motion --out export-motion
	$(BIN)/python -m himap_trt.data.motion --out demo-clips --n 1 --seed 1
	$(BIN)/himap-trt run --batch demo-clips/questions.jsonl --export-dir export-motion
	$(BIN)/himap-trt export --model tiny --out export-tiny
	$(BIN)/himap-trt run "$(PHOTO)" "What is the woman in the photo wearing?" --export-dir export-tiny

# lint-imports: the one-way layer contracts of pyproject.toml ([tool.importlinter]; docs/ARCHITECTURE.md)
test: $(VENV)/.installed
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

clean:
	rm -rf export export-tiny export-motion demo-scenes demo-clips engines eval.png .pytest_cache
