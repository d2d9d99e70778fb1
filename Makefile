# TeachCache — every target sets itself up first (make setup is a no-op once done).
# Override on the command line: make distil FOLD=1 CONFIG=configs/my.yaml KD=none, make setup TORCH="torch==2.13.0"
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
CONFIG ?= configs/demo.yaml
FOLD   ?= 0
FOLDS  ?=
SEEDS  ?=
KD     ?=
WORKERS ?=
GPUS   ?=
KD_SOURCE ?=
ONLINE ?=
RECIPES ?=
SCREEN ?=
ARGS   ?=
BENCH  ?= cpu

BIN := $(VENV)/bin
TC  := $(BIN)/teachcache
STAMP := $(VENV)/.installed

.PHONY: setup data preprocess teachers cache distil cv screen report demo-doc demo bench bench-store test lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/constraints.txt
	$(BIN)/python -m pip install --quiet -e ".[dev]" -c $(VENV)/constraints.txt
	touch $@

# writes the synthetic dataset when the config has dataset.synthetic; for your own data it only checks that
# dataset.raw_dir holds dataset.json, so every target below works on an nnU-Net raw dataset as it is
data: setup
	$(TC) synth --config $(CONFIG)

preprocess: data
	$(TC) preprocess --config $(CONFIG)

teachers: preprocess
	$(TC) teachers --config $(CONFIG) --fold $(FOLD)

# FOLD=k caches fold k's per-fold teachers; without it, every fold whose teacher checkpoints exist
cache: preprocess
	$(TC) cache --config $(CONFIG) $(if $(filter command line,$(origin FOLD)),--fold $(FOLD)) $(if $(WORKERS),--workers $(WORKERS)) $(ARGS)

# GPUS=n: data-parallel on n processes (torchrun, DistributedDataParallel; NCCL on CUDA, gloo on CPU)
distil: setup
	$(if $(GPUS),$(BIN)/torchrun --standalone --nproc_per_node=$(GPUS) -m teachcache,$(TC)) distil --config $(CONFIG) --fold $(FOLD) $(if $(KD),--kd $(KD)) $(if $(KD_SOURCE),--source $(KD_SOURCE)) $(ARGS)

# cross-validation: every fold (or FOLDS=0,1) of teachers → cache → no-KD and distilled students → report; re-run
# to resume (finished runs are skipped)
comma := ,
# a flag variable (ONLINE=1, SCREEN=1) is on unless empty, 0, no or false
on = $(filter-out 0 no false,$(1))
# RECIPES=configs/recipes/cb-pwd.yaml,…: those recipes too, from the same cache
cv: preprocess
	$(TC) cv --config $(CONFIG) $(foreach k,$(subst $(comma), ,$(FOLDS)),--fold $(k)) $(foreach s,$(subst $(comma), ,$(SEEDS)),--seed $(s)) $(if $(call on,$(ONLINE)),--online) $(foreach r,$(subst $(comma), ,$(RECIPES)),--recipe $(r)) $(ARGS)

# the recipes' screening (docs/recipes.md): every recipe of configs/recipes/ (or RECIPES=…), one seed, each student
# holding evaluation.screening_holdout of its training cases out; compared on those → runs_dir/screening/screening.md
screen: preprocess
	$(TC) cv --config $(CONFIG) --screen $(foreach k,$(subst $(comma), ,$(FOLDS)),--fold $(k)) $(foreach r,$(or $(subst $(comma), ,$(RECIPES)),$(wildcard configs/recipes/*.yaml)),--recipe $(r)) $(ARGS)

# every fold trained, with paired tests (make report); one fold's table with stage times (make report FOLD=0)
report: setup
	$(TC) report --config $(CONFIG) $(if $(filter command line,$(origin FOLD)),--fold $(FOLD)) $(if $(call on,$(SCREEN)),--screen) $(ARGS)

# docs/demo.md's evidence (claims, fold-level comparisons, runs, cost) rewritten from the report of `make cv`
DOC ?= docs/demo.md
demo-doc: setup
	$(BIN)/python scripts/demo_doc.py --config $(CONFIG) --doc $(DOC)

# The whole chain on the embedded synthetic dataset, fold 0.
demo: setup
	$(TC) synth --config $(CONFIG)
	$(TC) preprocess --config $(CONFIG)
	$(TC) teachers --config $(CONFIG) --fold 0
	$(MAKE) --no-print-directory cache CONFIG=$(CONFIG) FOLD=0
	$(MAKE) --no-print-directory distil CONFIG=$(CONFIG) FOLD=0 KD=none
	$(MAKE) --no-print-directory distil CONFIG=$(CONFIG) FOLD=0
	$(TC) report --config $(CONFIG) --fold 0

# Step time (no KD / cached / online) with loading, memory, store bytes, cache-stage overhead, what the cache saves
# over k students, paper-size loader → BENCHMARKS.md. BENCH=cpu (demo sizes, under 15 min on 2 cores once fold 0's
# demo teachers exist), BENCH=gpu (the paper's sizes) or BENCH=gpu-smoke (the GPU preset's path, small, on a CPU)
BENCH_CONFIG = $(if $(filter cpu,$(BENCH)),configs/demo.yaml,configs/bench-$(BENCH).yaml)
bench: setup
	$(TC) synth --config $(BENCH_CONFIG)
	$(TC) preprocess --config $(BENCH_CONFIG)
	$(TC) bench --preset $(BENCH) $(ARGS)

# Softmax encodings (B/voxel, KL at T = 1, 2, 4, MB/s) and patch read time, on the cached demo teachers.
bench-store: setup
	$(TC) bench-store --config $(CONFIG)

test: setup
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf runs data
