#!/usr/bin/env bash
# Run a training script as MPI ranks with mpiexec.
#
#   NPROCS=4 launch/mpiexec.sh train.py --backend mpi   # SyncBatchNorm over MPI.COMM_WORLD, no torch.distributed
#   NPROCS=4 launch/mpiexec.sh train.py                 # torch.distributed (gloo/NCCL) started from MPI ranks
#
# The script calls syncbn.init_distributed(), which reads the launcher's
# ranks (MPICH/Hydra PMI_RANK and PMI_SIZE, or Open MPI's OMPI_COMM_WORLD_*).
# With backend "mpi" the layers reduce over MPI.COMM_WORLD; otherwise rank 0
# opens a torch.distributed store on a free port and mpi4py sends its address
# to the others. Use the mpiexec of the MPI library that mpi4py is linked to
# (with `pip install mpich`, the one in the same virtual environment):
# another MPI's mpiexec starts N separate worlds of one, which
# init_distributed() detects and reports.
#
# Environment:
#   NPROCS        number of ranks (required)
#   MPIEXEC       the launcher (default: mpiexec beside PYTHON, else mpiexec on PATH)
#   MPIEXEC_ARGS  extra launcher options, e.g. "-hosts node01,node02" or "-ppn 4"
#   PYTHON        the interpreter that has torch, mpi4py and syncbn (default: python3)
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 2
fi
: "${NPROCS:?set NPROCS to the number of ranks (see launch/mpiexec.sh --help)}"

python=${PYTHON:-python3}
if [[ -z ${MPIEXEC:-} ]]; then
    beside=$(dirname "$(command -v "$python")")/mpiexec
    if [[ -x $beside ]]; then MPIEXEC=$beside; else MPIEXEC=mpiexec; fi
fi
extra=()
# Open MPI refuses root and more ranks than cores unless told; MPICH needs neither flag.
if "$MPIEXEC" --version 2>/dev/null | grep -q "Open MPI"; then
    extra+=(--oversubscribe)
    if [[ $(id -u) == 0 ]]; then extra+=(--allow-run-as-root); fi
fi
# shellcheck disable=SC2086  # MPIEXEC_ARGS is a list of options, split on purpose
exec "$MPIEXEC" -n "$NPROCS" "${extra[@]}" ${MPIEXEC_ARGS:-} "$python" "$@"
