#!/usr/bin/env bash
# Run a training script on this machine with torchrun: one process per GPU (per CPU core without CUDA).
#
#   launch/torchrun_single_node.sh train.py [script arguments...]
#   NPROC_PER_NODE=4 launch/torchrun_single_node.sh examples/train_cnn.py --steps 20
#
# The script calls syncbn.init_distributed(), which reads torchrun's RANK,
# WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. --standalone starts a
# private rendezvous on a free local port, so several jobs can share a machine.
#
# Environment:
#   NPROC_PER_NODE  processes to start (default "auto": the GPUs, or the CPU cores without CUDA)
#   PYTHON          the interpreter that has torch and syncbn (default: python3)
#   MAX_RESTARTS    torchrun restarts of the whole group after a failure (default 0)
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 2
fi

exec "${PYTHON:-python3}" -m torch.distributed.run \
    --standalone \
    --nproc-per-node "${NPROC_PER_NODE:-auto}" \
    --max-restarts "${MAX_RESTARTS:-0}" \
    "$@"
