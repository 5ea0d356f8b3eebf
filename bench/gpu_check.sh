#!/usr/bin/env bash
# The GPU check: tests/test_cuda.py (its MPI test runs the CUDA tests of tests/test_mpi.py under
# mpiexec -n 2) and the GPU benchmark, on a machine with one CUDA GPU, torch and CuPy already installed
# (no install of the project: it runs from the checkout). Writes at most 7 files to OUT_DIR:
#   env.txt  test_cuda.log  test_cuda.xml  bench_gpu.json  bench_gpu.md  bench_gpu.log  summary.txt
# (test_cuda.log has a line per test as it ends, and the benchmark rewrites its results after every
# configuration: a step cut short by its limit still leaves what it did.)
#
#   bash bench/gpu_check.sh OUT_DIR            (make gpu-check OUT=OUT_DIR)
#   bash bench/gpu_check.sh --dry-run          (anywhere: what would run, up to the first CUDA call)
#
# MPI: mpiexec and pytest-mpi are used when importable; otherwise the cp312 wheels in .gpu-wheels/
# (make gpu-wheels downloads them: mpich, mpi4py, pytest-mpi) are installed into OUT_DIR's scratch first.
# Time: a few minutes on an H100 or H200; the steps' limits (30 + 240 + 150 s, 10 s more each to be killed)
# keep the whole under 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ "${1:-}" = "--dry-run" ]; then
    export SYNCBN_GPU_CHECK_DRY_RUN=1
    OUT=$(mktemp -d)
else
    OUT=${1:?usage: bench/gpu_check.sh OUT_DIR}
fi
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Inductor compiles in the test process: a pool of compile workers would outlive the tests that start it.
export TORCHINDUCTOR_COMPILE_THREADS=1
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
summary="$OUT/summary.txt"
: >"$summary"
step() {  # step NAME LIMIT_SECONDS LOG COMMAND...: run, record its exit status and time in the summary
    local name=$1 limit=$2 log=$3
    shift 3
    local began=$SECONDS
    if [ -n "${SYNCBN_GPU_CHECK_DRY_RUN:-}" ]; then
        echo "would run ($limit s): $*" | tee -a "$summary"
        return 0
    fi
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    local status=$?
    echo "$name: exit $status after $((SECONDS - began)) s" | tee -a "$summary"
    return 0
}

if ! $PYTHON -c "import mpi4py, pytest_mpi" 2>/dev/null || ! command -v mpiexec >/dev/null; then
    if ls .gpu-wheels/*.whl >/dev/null 2>&1; then
        # --ignore-installed: a machine may have mpi4py already (without an MPI library); pip would then
        # leave it out of the prefix.
        $PYTHON -m pip install -q --ignore-installed --no-index --no-deps --prefix "$SCRATCH/mpi" .gpu-wheels/*.whl \
            >>"$summary" 2>&1
        site=$(ls -d "$SCRATCH"/mpi/lib/python3*/site-packages)
        export PATH="$SCRATCH/mpi/bin:$PATH" PYTHONPATH="$PYTHONPATH:$site" LD_LIBRARY_PATH="$SCRATCH/mpi/lib:${LD_LIBRARY_PATH:-}"
        timeout 60 mpiexec -n 2 $PYTHON -c "from mpi4py import MPI; import mpi4py
if MPI.COMM_WORLD.rank == 0: print('mpi from .gpu-wheels:', mpi4py.__version__, MPI.Get_library_version().split(chr(10))[0].strip(), 'x', MPI.COMM_WORLD.size)" \
            >>"$summary" 2>&1 || echo "the MPI wheels do not run: mpiexec -n 2 failed" | tee -a "$summary"
    else
        echo "no MPI: the mpiexec tests are skipped (make gpu-wheels brings the wheels)" | tee -a "$summary"
    fi
fi

$PYTHON -c "import sys, torch, pytest; print('python', sys.version.split()[0], 'torch', torch.__version__, 'pytest', pytest.__version__)" \
    >>"$summary" 2>&1 || echo "pytest or torch is missing: the tests cannot run" | tee -a "$summary"
step env 30 "$OUT/env.txt" $PYTHON -m syncbn env
step test_cuda 240 "$OUT/test_cuda.log" $PYTHON -m pytest -v -rs -p no:cacheprovider -o timeout=120 tests/test_cuda.py \
    --junitxml="$OUT/test_cuda.xml" -o junit_family=xunit2
if [ -n "${SYNCBN_GPU_CHECK_DRY_RUN:-}" ]; then
    $PYTHON bench/bench_gpu.py --dry-run | tee -a "$summary"
    $PYTHON -m pytest -q -p no:cacheprovider --co tests/test_cuda.py | tail -1 | tee -a "$summary"
else
    step bench_gpu 150 "$OUT/bench_gpu.log" $PYTHON bench/bench_gpu.py --out-dir "$OUT" --time-limit 120
fi
echo "results in $OUT" | tee -a "$summary"
