#!/usr/bin/env bash
# Run a training script on several machines with torchrun: start this same command on every node.
#
#   NNODES=2 RDZV_ENDPOINT=node01:29400 launch/torchrun_multi_node.sh train.py [script arguments...]
#
# The nodes meet through torchrun's c10d rendezvous: the agent on the host of
# RDZV_ENDPOINT serves a store there, the others connect to it, and together
# they number the workers (no node rank to hand out). Each worker then calls
# syncbn.init_distributed(), which reads the RANK, WORLD_SIZE, LOCAL_RANK,
# MASTER_ADDR and MASTER_PORT that torchrun set. Under Slurm, use
# slurm/torchrun_per_node.sbatch, which fills these in.
#
# Environment:
#   NNODES          number of nodes (required; "MIN:MAX" for an elastic job)
#   RDZV_ENDPOINT   host:port that every node can reach, on one of the nodes (required)
#   RDZV_ID         a job id shared by the nodes of one job and no other (default: syncbn)
#   NPROC_PER_NODE  processes per node (default "auto": the GPUs, or the CPU cores without CUDA)
#   PYTHON          the interpreter that has torch and syncbn (default: python3)
#   MAX_RESTARTS    torchrun restarts of the whole group after a failure (default 0)
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 2
fi
: "${NNODES:?set NNODES to the number of nodes (see launch/torchrun_multi_node.sh --help)}"
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT to host:port on the first node (see launch/torchrun_multi_node.sh --help)}"

exec "${PYTHON:-python3}" -m torch.distributed.run \
    --nnodes "$NNODES" \
    --nproc-per-node "${NPROC_PER_NODE:-auto}" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$RDZV_ENDPOINT" \
    --rdzv-id "${RDZV_ID:-syncbn}" \
    --max-restarts "${MAX_RESTARTS:-0}" \
    "$@"
