# make test : lint, then the whole suite: plain pytest, gloo in real processes, the launch/ wrappers,
#             mpiexec -n 2 and -n 4, and the slurm/ templates on a real one-node Slurm cluster; the CUDA kernels
#             are compiled by nvcc (checked) and by g++ (run on CPU tensors in tests/cuda_emulator.py)
# make demo : `syncbn demo`: small per-rank batches on 1-8 CPU ranks, unsynchronised BN vs SyncBatchNorm vs
#             GroupNorm (a few minutes) -> docs/demo.{md,png,json}
# make bench: `syncbn bench` over 1-8 gloo ranks -> bench/results/, then the scaling projection -> docs/scaling.*
# make bench-2ranks: the 2-rank CPU comparison with fairscale and the all-reduce floor -> bench/results/
# make soak : 4 CPU ranks x 2,000 training steps of a small CNN, over gloo (torchrun) then MPI: running statistics
#             against a float64 oracle, flat RSS, no growing allocation -> bench/results/soak_cpu_{gloo,mpi}.*
# make gpu-check OUT=dir: on a GPU machine (torch and CuPy installed, nothing else needed): tests/test_cuda.py
#             and the GPU benchmark, logs and results in dir (under 8 minutes; bench/gpu_check.sh)
# make gpu-wheels: the cp312 MPI wheels (mpich, mpi4py, pytest-mpi) into .gpu-wheels/, for a GPU machine
#             without network (gpu-check installs them there)
# make reliability: 50 rounds of a minimal job and examples/train_cnn.py under every launcher (srun too, on the
#             local Slurm cluster when it starts) with two busy loops beside them: every run must exit 0 and leave
#             no process; then syncbn demo and bench ended by signals (about 2 hours 10 minutes on 2 cores)
#             -> bench/results/reliability.*
#
# These targets are the only ones that write the committed results; the commands themselves write to a new
# temporary directory unless given an output directory.
#
# Each target creates .venv and installs what it needs. torch is pinned to
# 2.13.0 by default (a CPU build installs without the CUDA packages); override
# with e.g. `make test TORCH=torch`.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
MPIEXEC := $(VENV)/bin/mpiexec
# A hung multi-process run is a failure, never a stuck job.
MPI_TIMEOUT ?= 900

SLURM_CLUSTER := slurm/ci/local-cluster.sh

.PHONY: install test lint pytest mpi-test slurm-test demo equivalence bench bench-2ranks soak reliability gpu-check \
	gpu-wheels clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[mpi,test,lint]"
	touch $@

# The compiled CPU path (syncbn/csrc), built into the cache once per source and torch (about 40 s), so that the
# tests' first training calls do not all wait for it; rebuilt here whenever the source changes.
install: $(VENV)/.installed
	$(PY) -c "import sys, syncbn._extension as e; sys.exit(e.main())"

lint: install
	$(PY) -m ruff check syncbn tests bench examples
	$(PY) -m ruff format --check syncbn tests bench examples
	for script in launch/*.sh slurm/*.sbatch bench/gpu_check.sh $(SLURM_CLUSTER); do bash -n $$script || exit 1; done
	$(PY) -m mypy

pytest: install
	$(PY) -m pytest -q -rs --ignore=tests/test_mpi.py --ignore=tests/test_slurm.py

mpi-test: install
	$(PY) -m pytest -q -rs --with-mpi -p no:cacheprovider tests/test_mpi.py
	timeout $(MPI_TIMEOUT) $(MPIEXEC) -n 2 $(PY) -m pytest -q -rs --with-mpi -p no:cacheprovider tests/test_mpi.py
	timeout $(MPI_TIMEOUT) $(MPIEXEC) -n 4 $(PY) -m pytest -q -rs --with-mpi -p no:cacheprovider tests/test_mpi.py

# Starts a one-node Slurm cluster (installing Debian's slurm-wlm and munge when missing; needs root),
# submits every slurm/ template, and stops the cluster again. Without root it is skipped, except in CI.
slurm-test: install
	@status=0; bash $(SLURM_CLUSTER) start || status=$$?; \
	if [ $$status -eq 3 ] && [ -z "$$CI" ]; then \
		echo "slurm-test: SKIPPED: starting a Slurm cluster needs root (run 'sudo make slurm-test')"; exit 0; \
	fi; \
	if [ $$status -ne 0 ]; then exit $$status; fi; \
	rc=0; $(PY) -m pytest -q -p no:cacheprovider tests/test_slurm.py || rc=$$?; \
	bash $(SLURM_CLUSTER) stop; exit $$rc

test: lint pytest mpi-test slurm-test

demo: install
	$(PY) -m pip install -q -e ".[demo]"
	$(PY) -m syncbn demo --output-dir docs

# The 4-rank MPI check that SyncBatchNorm training equals single-process full-batch training, step by step.
equivalence: install
	timeout $(MPI_TIMEOUT) $(MPIEXEC) -n 4 $(PY) examples/full_batch_equivalence.py

bench: install
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -m syncbn bench --output-dir bench/results
	$(PY) -m syncbn bench --project --from-json bench/results/syncbn_bench_cpu.json --docs-dir docs

bench-2ranks: install
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) bench/bench_cpu.py --out-dir bench/results

# Both soaks run even when the first fails; the target fails if either does.
soak: install
	$(PY) -m pip install -q -e ".[bench]"
	@status=0; \
	OMP_NUM_THREADS=1 timeout $(MPI_TIMEOUT) $(VENV)/bin/torchrun --standalone --nproc-per-node 4 bench/soak.py \
		--out bench/results/soak_cpu_gloo || status=$$?; \
	OMP_NUM_THREADS=1 timeout $(MPI_TIMEOUT) $(MPIEXEC) -n 4 $(PY) bench/soak.py --backend mpi \
		--out bench/results/soak_cpu_mpi || status=$$?; \
	exit $$status

reliability: install
	@slurm=--slurm; status=0; bash $(SLURM_CLUSTER) start || status=$$?; \
	if [ $$status -ne 0 ]; then echo "reliability: no Slurm cluster (exit $$status): srun left out"; slurm=; fi; \
	rc=0; $(PY) bench/reliability.py --runs 50 --load 2 $$slurm --output-dir bench/results || rc=$$?; \
	if [ -n "$$slurm" ]; then bash $(SLURM_CLUSTER) stop; fi; exit $$rc

# No install: a GPU machine has its own torch and CuPy, and maybe no network.
OUT ?= gpu-check-results
gpu-check:
	bash bench/gpu_check.sh $(OUT)

# pip takes a --platform tag literally: mpich's wheel is manylinux_2_28, mpi4py's manylinux1/2_5, so every
# tag a glibc 2.28 machine accepts is listed.
GPU_PLATFORMS = manylinux_2_28 manylinux_2_17 manylinux2014 manylinux_2_5 manylinux1
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(foreach tag,$(GPU_PLATFORMS),--platform $(tag)_x86_64) --dest .gpu-wheels mpich mpi4py pytest-mpi
	ls .gpu-wheels/mpich-*.whl .gpu-wheels/mpi4py-*.whl .gpu-wheels/pytest_mpi-*.whl

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
