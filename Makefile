# Set-up and checks. `make serve` and `make test` install what they need first (idempotent).
PY ?= python3
PIP := $(PY) -m pip
STAMP := .cache/install.stamp

# torch: the CPU build, chosen explicitly (the `+cpu` local version). PyPI's Linux wheel of torch is
# the CUDA build, so the CPU wheel comes from a local wheel folder (pip's find-links) when one has
# it, else from PyTorch's CPU index. GPU hosts: `make install TORCH=torch==2.13.0 TORCH_INDEX=` (the
# CUDA build from PyPI; keep TORCH_INDEX empty, or pip prefers the +cpu wheel of the same version).
TORCH ?= torch==2.13.0+cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# Where `make render-demo` writes (git-ignored).
DEMO_OUT ?= out/demo.mp4

.PHONY: install serve render-demo test test-all lint kernels

install: $(STAMP)

# mediapipe 0.10.21 is the last release that ships its face models. It declares numpy<2, protobuf<5
# and jax, which this project does not use (its face models run with numpy 2 and protobuf 6, tested);
# pipecat-ai pins older soundfile/soxr than ours (its other requirements: extra [pipecat]). Both go in
# last and with --no-deps: pip then skips its dependency check, and the install prints no
# "dependency resolver" error about their declared requirements. pipecat-ai-small-webrtc-prebuilt (the
# page of examples/pipecat_echo_avatar.py) declares fastapi[all] for one StaticFiles line: --no-deps too.
$(STAMP): pyproject.toml Makefile CMakeLists.txt
	$(PIP) install -q --no-index $(TORCH) 2>/dev/null || $(PIP) install -q $(TORCH) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) install -q -e ".[dev,face,pipecat,livekit]"
	$(PIP) install -q --no-deps mediapipe==0.10.21 pipecat-ai==1.14.0 pipecat-ai-small-webrtc-prebuilt==2.5.0
	mkdir -p .cache && touch $(STAMP)

serve: install
	$(PY) -m rt_engine.serve

render-demo: install
	mkdir -p $(dir $(DEMO_OUT))
	$(PY) -m rt_engine.render --identity rt_engine/assets/identity.jpg --audio rt_engine/assets/speech.flac \
		--pose idle --out $(DEMO_OUT)

test: install
	$(PY) -m pytest

test-all: install
	$(PY) -m pytest -m "not gpu"

# formatting and lint rules: pyproject.toml [tool.ruff]
lint: install
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

kernels:
	cmake -S . -B build/kernels -DCMAKE_BUILD_TYPE=Release && cmake --build build/kernels -j2
