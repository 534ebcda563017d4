# Two commands on a fresh machine: `make demo` and `make test`. Each installs first (fast when installed).
PYTHON ?= python3
# The CPU build of torch, installed before anything can pull a multi-GB CUDA build; a torch already installed
# (Colab's, a GPU box's) is kept. Override e.g. TORCH="torch --index-url <a CPU wheel index>".
TORCH ?= torch==2.13.0
STAMP := .installed
# sdist and wheel for `make test`'s package checks (build/ is ignored by git)
DIST := build/test-dist

.PHONY: install demo test bench sync outputs gpu-check gpu-bundle gpu-rehearsal
install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q $(TORCH)
	$(PYTHON) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

# The main job on the embedded default: the tiny LLaMA fine-tuned on the bundled English -> Indonesian task (CPU).
demo: install
	lora-kit finetune --output lora-kit-output
	lora-kit estimate --model llama-2-7b --method qlora --rank 8

test: install
	$(PYTHON) tools/check_sync.py
	OMP_NUM_THREADS=1 nbdev-test  # two notebooks at once, one thread each: no oversubscription on 2 cores
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest --durations=15  # every test but the GPU rehearsal (below); the 15 slowest named
	rm -rf $(DIST) && $(PYTHON) -m build --outdir $(DIST) .  # the sdist, then the wheel built from it
	$(PYTHON) -m twine check --strict $(DIST)/*
	$(PYTHON) tools/run_lessons.py --wheel $(DIST)/lora_kit-*.whl  # each lesson alone, from the installed wheel

bench: install
	lora-kit bench

# The prepared measurement for a machine with a GPU (LLaMA-2-7B shapes, random weights, no downloads): QLoRA and LoRA,
# lora_kit vs peft, tokens/s and peak memory against the estimate; report in $OUT (a lent machine) or gpu-check/.
# Without a GPU: a tiny dry run. With a bundle (make gpu-bundle) it installs nothing from an index: on a lent machine,
# carry build/gpu-wheels and run `make gpu-check`. GPU_ARGS passes options, e.g. GPU_ARGS="--budget 300".
GPU_WHEELS ?= build/gpu-wheels
GPU_ARGS ?=
gpu-check:
	@if [ -d "$(GPU_WHEELS)" ]; then $(PYTHON) tools/gpu_check.py --wheels "$(GPU_WHEELS)" $(GPU_ARGS); \
	else $(MAKE) -s install && $(PYTHON) tools/gpu_check.py $(GPU_ARGS); fi

# The wheels a GPU machine without a package index lacks, for its Python 3.12 (<= 60 MiB): build/gpu-wheels/
gpu-bundle:
	$(PYTHON) tools/gpu_bundle.py --dest $(GPU_WHEELS)

# `make gpu-check` on a stand-in of the GPU machine (its package versions, no bitsandbytes/datasets), offline
gpu-rehearsal: install
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -m gpu_rehearsal -s tests/test_gpu_rehearsal.py

# Run the lessons in place at learner sizes and store their outputs in the notebooks (GitHub and Colab show them).
# One lesson: make outputs NB=nbs/05_widgets.ipynb
outputs: install
	$(PYTHON) tools/run_lessons.py --save $(NB)

sync:
	nbdev-export && nbdev-clean && $(PYTHON) tools/readme.py
