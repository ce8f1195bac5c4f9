# Set-up and checks. `make serve` and `make test` install what they need first (idempotent).
PY ?= python3
PIP := $(PY) -m pip
STAMP := .cache/install.stamp

.PHONY: install serve render-demo test test-all lint kernels

install: $(STAMP)

# torch first and pinned: the CPU build installs from local disk; an unpinned torch would pull a CUDA build.
# mediapipe 0.10.21 is the last release that ships its face models; it pins old numpy, hence --no-deps.
# pipecat-ai pins older soundfile/soxr than ours, hence --no-deps too (its other requirements: extra [pipecat]).
$(STAMP): pyproject.toml Makefile CMakeLists.txt
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-deps mediapipe==0.10.21
	$(PIP) install -q --no-deps pipecat-ai==1.14.0
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) install -q -e ".[dev,face,pipecat,livekit]"
	mkdir -p .cache && touch $(STAMP)

serve: install
	$(PY) -m rt_engine.serve

render-demo: install
	$(PY) -m rt_engine.render --identity rt_engine/assets/identity.jpg --audio rt_engine/assets/speech.flac \
		--pose idle --out demo.mp4

test: install
	$(PY) -m pytest

test-all: install
	$(PY) -m pytest -m "not gpu"

lint:
	$(PY) -m ruff check .

kernels:
	cmake -S . -B build/kernels -DCMAKE_BUILD_TYPE=Release && cmake --build build/kernels -j2
