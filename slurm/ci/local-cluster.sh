#!/usr/bin/env bash
# slurm/ci/local-cluster.sh start|stop|status
#
# A real, one-node Slurm cluster on this host, for tests that want to run
# syncbn under `sbatch`/`srun` (CI runners, throwaway VMs and containers).
# Written for Debian 12 (bookworm, Slurm 22.05, munge 0.5.15); needs root.
#
#   start   install slurm-wlm, munge and libpmix-dev with apt-get if a tool is
#           missing, write the configuration, start munged, slurmctld and
#           slurmd, and wait until the node is idle. Idempotent: when the
#           cluster already runs and is idle it says so and exits 0.
#   stop    stop the daemons this script started, put back a slurm.conf that
#           was there before, remove the state directory. Exit 0 when
#           nothing runs.
#   status  print `sinfo`; exit 0 when the node is idle, 1 otherwise.
#
# Exit codes: 0 ok, 1 failure, 2 usage, 3 root is needed (tests use this to
# skip on laptops).
#
# Environment:
#   SYNCBN_SLURM_DIR   state directory (default /tmp/syncbn-slurm): spool,
#                      saved state, logs, pid files and a copy of the config.
#   SYNCBN_SLURM_WAIT  seconds `start` waits for the node to be idle (60).
#
# The unusual settings, and why:
#   * Where the config lives. Slurm's commands read $SLURM_CONF, else the
#     compiled-in /etc/slurm/slurm.conf. Exporting SLURM_CONF would only reach
#     this script's children; the test processes that later call sbatch,
#     srun or sinfo would not have it. So the script writes
#     /etc/slurm/slurm.conf itself (an existing file that is not ours is moved
#     to slurm.conf.syncbn-backup and moved back by `stop`); the master copy
#     lives in the state directory. A caller's SLURM_CONF that points
#     elsewhere would win over /etc/slurm, so `start` warns about it.
#   * NodeName=... CPUs=8 with SlurmdParameters=config_overrides: the node
#     claims 8 CPUs whatever the hardware has, so jobs of 4-8 tasks run (each
#     task one "CPU") on a 2-core runner. Without config_overrides slurmd
#     reports the real core count and slurmctld drains the node for having
#     fewer CPUs than configured.
#   * ProctrackType=proctrack/linuxproc and TaskPlugin=task/none: no
#     systemd and no usable delegated cgroup tree in CI containers, so no
#     cgroup plugins; linuxproc tracks job processes through their parent
#     ids, task/none does no binding. Nothing here loads a cgroup plugin, so
#     Slurm 22.05 needs no cgroup.conf.
#   * SlurmUser=root, SlurmdUser=root: no slurm account to prepare; the
#     cluster exists only for the duration of a test run.
#   * AccountingStorageType=accounting_storage/none and
#     JobAcctGatherType=jobacct_gather/none: no slurmdbd, so `sacct` has
#     nothing; check a job with `sbatch --wait`'s exit code or
#     `scontrol show job ID` (kept MinJobAge=300 s after it ends).
#   * MpiDefault=none: pick `srun --mpi=pmi2` explicitly for MPICH from PyPI
#     (pmi2 works with it; --mpi=pmix does not). libpmix-dev is installed
#     because Debian's mpi/pmix plugin loads the unversioned libpmix.so.
#   * ReturnToService=2: a node that went DOWN (e.g. slurmd restarted)
#     becomes usable again as soon as it registers with valid settings.
#   * munged runs as the munge user (`runuser -u munge`): munged refuses to
#     run as root. Its socket directory /run/munge is created by hand,
#     because no init system creates it here. If a munged already answers
#     `munge -n | unmunge`, it is used and `stop` leaves it alone.
#   * apt-get runs with a temporary /usr/sbin/policy-rc.d that says 101, so
#     the packages' maintainer scripts start no daemons of their own; every
#     daemon that runs was started by this script and `stop` can end it.
set -euo pipefail

readonly PROG=${0##*/}
readonly STATE_DIR=${SYNCBN_SLURM_DIR:-/tmp/syncbn-slurm}
readonly WAIT_S=${SYNCBN_SLURM_WAIT:-60}
readonly ETC_DIR=/etc/slurm
readonly ETC_CONF=$ETC_DIR/slurm.conf
readonly BACKUP_CONF=$ETC_CONF.syncbn-backup
readonly MARKER="# syncbn-ci: written by slurm/ci/local-cluster.sh"
readonly MUNGE_KEY=/etc/munge/munge.key
readonly MUNGE_RUN=/run/munge
readonly MUNGED=/usr/sbin/munged
readonly CONF=$STATE_DIR/slurm.conf
readonly CTLD_PID=$STATE_DIR/run/slurmctld.pid
readonly SLURMD_PID=$STATE_DIR/run/slurmd.pid
readonly MUNGED_PID=$STATE_DIR/run/munged.pid # only when this script started it
readonly CTLD_LOG=$STATE_DIR/log/slurmctld.log
readonly SLURMD_LOG=$STATE_DIR/log/slurmd.log
readonly TOOLS=(slurmctld slurmd munged sbatch srun sinfo)
readonly PACKAGES=(slurm-wlm munge libpmix-dev)
NODE=$(hostname -s)
readonly NODE
readonly CALLER_SLURM_CONF=${SLURM_CONF:-}
# This script's own Slurm commands read the config it writes, whatever the
# caller's environment says.
export SLURM_CONF=$ETC_CONF
export PATH=$PATH:/usr/sbin:/sbin

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}
usage() {
  cat >&2 <<EOF
usage: $PROG start|stop|status

  start   install Slurm and munge if needed, start a one-node cluster
          (node $NODE, partition debug) and wait until it is idle
  stop    stop the daemons, restore /etc/slurm/slurm.conf, remove the state
  status  print sinfo; exit 0 when the node is idle, 1 otherwise

State directory: $STATE_DIR (set SYNCBN_SLURM_DIR to change it).
EOF
}

is_root() { [[ $(id -u) -eq 0 ]]; }

need_root() {
  if ! is_root; then
    echo "$PROG: root is needed to $1" >&2
    exit 3
  fi
}

missing_tools() {
  local t missing=()
  for t in "${TOOLS[@]}"; do
    command -v "$t" >/dev/null 2>&1 || missing+=("$t")
  done
  echo "${missing[*]}"
}

# The PID in pid file $1 when that process is alive and its command is $2.
live_pid() {
  local file=$1 comm=$2 pid
  [[ -r $file ]] || return 1
  pid=$(tr -dc '0-9' <"$file")
  [[ -n $pid ]] || return 1
  [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]] || return 1
  echo "$pid"
}

# Node state as sinfo reports it (idle, idle*, down*, drained, ...), or "".
# Asks only when our slurmctld runs: without a config or a controller, sinfo
# retries for up to a minute.
node_state() {
  live_pid "$CTLD_PID" slurmctld >/dev/null || return 0
  timeout 10 sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n 1 || true
}

# The node serves jobs: idle, or busy with some (a trailing * would mean
# that slurmd does not respond).
node_up() {
  case $(node_state) in
  idle | mixed | allocated | completing) return 0 ;;
  *) return 1 ;;
  esac
}

# ---------------------------------------------------------------- install --

install_packages() {
  local missing
  missing=$(missing_tools)
  [[ -z $missing ]] && return 0
  need_root "install ${PACKAGES[*]} (missing: $missing)"
  log "installing ${PACKAGES[*]} (missing: $missing)"
  local policy=/usr/sbin/policy-rc.d own_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\n# temporary, from %s\nexit 101\n' "$PROG" >"$policy"
    chmod 755 "$policy"
    own_policy=1
  fi
  local apt=(apt-get install -y -q --no-install-recommends "${PACKAGES[@]}")
  local rc=0
  if ! DEBIAN_FRONTEND=noninteractive "${apt[@]}" >"/tmp/syncbn-apt.log" 2>&1; then
    log "apt-get install failed; running apt-get update and trying again"
    DEBIAN_FRONTEND=noninteractive apt-get update -q >>"/tmp/syncbn-apt.log" 2>&1 || true
    DEBIAN_FRONTEND=noninteractive "${apt[@]}" >>"/tmp/syncbn-apt.log" 2>&1 || rc=$?
  fi
  ((own_policy)) && rm -f "$policy"
  if ((rc != 0)); then
    tail -n 20 /tmp/syncbn-apt.log >&2
    die "apt-get install ${PACKAGES[*]} failed (log: /tmp/syncbn-apt.log)"
  fi
  missing=$(missing_tools)
  [[ -z $missing ]] || die "still missing after install: $missing"
}

# ----------------------------------------------------------------- config --

write_config() {
  mkdir -p "$STATE_DIR"/{state,spool,log,run}
  touch "$STATE_DIR/.syncbn-local-cluster"
  cat >"$CONF" <<EOF
$MARKER
# One-node test cluster; see the header of slurm/ci/local-cluster.sh.
ClusterName=syncbn-ci
SlurmctldHost=$NODE
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$CTLD_LOG
SlurmdLogFile=$SLURMD_LOG
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
MinJobAge=300
KillWait=5
NodeName=$NODE CPUs=8 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  mkdir -p "$ETC_DIR"
  if [[ -e $ETC_CONF ]] && ! grep -qxF "$MARKER" "$ETC_CONF"; then
    if [[ -e $BACKUP_CONF ]]; then
      die "$ETC_CONF is not ours and $BACKUP_CONF exists already; sort them out by hand"
    fi
    log "moving the existing $ETC_CONF to $BACKUP_CONF"
    mv "$ETC_CONF" "$BACKUP_CONF"
  fi
  cp "$CONF" "$ETC_CONF"
}

# ------------------------------------------------------------------ munge --

munge_answers() {
  munge -n 2>/dev/null | unmunge >/dev/null 2>&1
}

start_munge() {
  if munge_answers; then
    log "munged already runs and answers"
    return 0
  fi
  if [[ ! -s $MUNGE_KEY ]]; then
    log "creating $MUNGE_KEY"
    mkdir -p "${MUNGE_KEY%/*}"
    if command -v mungekey >/dev/null 2>&1; then
      mungekey --create --keyfile="$MUNGE_KEY" --force
    elif command -v create-munge-key >/dev/null 2>&1; then
      create-munge-key -f
    else
      dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
    fi
    chown munge:munge "$MUNGE_KEY"
    chmod 0400 "$MUNGE_KEY"
  fi
  mkdir -p "$MUNGE_RUN"
  chown munge:munge "$MUNGE_RUN"
  chmod 0755 "$MUNGE_RUN"
  log "starting munged as the munge user"
  runuser -u munge -- "$MUNGED" || die "munged did not start (see /var/log/munge/munged.log)"
  local i
  for ((i = 0; i < 50; i++)); do
    munge_answers && break
    sleep 0.1
  done
  munge_answers || die "munged does not answer munge -n | unmunge"
  # munged daemonizes and writes its own pid file; keep a copy, which marks
  # it as ours for `stop`.
  tr -dc '0-9' <"$MUNGE_RUN/munged.pid" >"$MUNGED_PID"
}

# ------------------------------------------------------------------ slurm --

start_daemon() {
  local name=$1 pidfile=$2 logfile=$3
  if live_pid "$pidfile" "$name" >/dev/null; then
    log "$name already runs (pid $(live_pid "$pidfile" "$name"))"
    return 0
  fi
  if pgrep -x "$name" >/dev/null 2>&1; then
    die "a $name that this script did not start runs already (pid $(pgrep -x "$name" | tr '\n' ' ')); stop it first"
  fi
  log "starting $name"
  # Both daemons fork into the background and write their pid files.
  "/usr/sbin/$name" -f "$CONF" || {
    tail -n 20 "$logfile" >&2 2>/dev/null || true
    die "$name did not start"
  }
  local i
  for ((i = 0; i < 50; i++)); do
    live_pid "$pidfile" "$name" >/dev/null && return 0
    sleep 0.1
  done
  tail -n 20 "$logfile" >&2 2>/dev/null || true
  die "$name wrote no pid file ($pidfile) or died; log: $logfile"
}

wait_idle() {
  local deadline=$((SECONDS + WAIT_S)) state resumed=0
  log "waiting up to ${WAIT_S}s for node $NODE to be idle"
  while ((SECONDS < deadline)); do
    state=$(node_state)
    case $state in
    idle) return 0 ;;
    down* | drain*)
      if ((!resumed)); then
        log "node $NODE is $state; resuming it"
        scontrol update nodename="$NODE" state=resume 2>/dev/null || true
        resumed=1
      fi
      ;;
    *) ;;
    esac
    live_pid "$CTLD_PID" slurmctld >/dev/null || break
    live_pid "$SLURMD_PID" slurmd >/dev/null || break
    sleep 1
  done
  log "node $NODE is not idle (state: '${state:-no answer}'); sinfo:"
  timeout 10 sinfo >&2 2>&1 || true
  local f
  for f in "$CTLD_LOG" "$SLURMD_LOG"; do
    echo "---- tail of $f" >&2
    tail -n 25 "$f" >&2 2>/dev/null || true
  done
  die "the cluster did not come up (the daemons still run: '$PROG stop' ends them)"
}

# --------------------------------------------------------------- commands --

cmd_start() {
  local t0=$SECONDS
  if [[ -n $(missing_tools) ]]; then
    install_packages
  elif node_up && live_pid "$CTLD_PID" slurmctld >/dev/null &&
    live_pid "$SLURMD_PID" slurmd >/dev/null; then
    log "already running: node $NODE is $(node_state) ($STATE_DIR)"
    return 0
  fi
  need_root "start slurmctld, slurmd and munged"
  if [[ -n $CALLER_SLURM_CONF && $CALLER_SLURM_CONF != "$ETC_CONF" ]]; then
    log "warning: SLURM_CONF=$CALLER_SLURM_CONF in your environment overrides $ETC_CONF for sbatch/srun/sinfo; unset it"
  fi
  write_config
  start_munge
  start_daemon slurmctld "$CTLD_PID" "$CTLD_LOG"
  start_daemon slurmd "$SLURMD_PID" "$SLURMD_LOG"
  wait_idle
  log "cluster up in $((SECONDS - t0))s: node $NODE idle, partition debug, state $STATE_DIR"
}

# Stop the process in pid file $1 if it is a live $2: SIGTERM, up to 10 s,
# then SIGKILL.
stop_pid() {
  local file=$1 comm=$2 pid i
  pid=$(live_pid "$file" "$comm") || {
    rm -f "$file"
    return 0
  }
  log "stopping $comm (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    [[ -d /proc/$pid ]] || break
    sleep 0.1
  done
  if [[ -d /proc/$pid ]]; then
    log "$comm (pid $pid) ignored SIGTERM for 10s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.2
  fi
  rm -f "$file"
}

cmd_stop() {
  local have_state=0
  [[ -e $STATE_DIR/.syncbn-local-cluster ]] && have_state=1
  if ((!have_state)) && ! grep -qxsF "$MARKER" "$ETC_CONF" && [[ ! -e $BACKUP_CONF ]]; then
    log "nothing to stop ($STATE_DIR holds no cluster)"
    return 0
  fi
  need_root "stop the cluster"
  if ((have_state)); then
    # Cancel what still runs so that no slurmstepd outlives its slurmd.
    if live_pid "$CTLD_PID" slurmctld >/dev/null; then
      local jobs
      jobs=$(timeout 10 squeue -h -o %i 2>/dev/null | tr '\n' ' ' || true)
      if [[ -n ${jobs// /} ]]; then
        log "cancelling jobs: $jobs"
        # shellcheck disable=SC2086 # one job id per word
        timeout 10 scancel $jobs 2>/dev/null || true
        local i
        for ((i = 0; i < 20; i++)); do
          [[ -z $(timeout 5 squeue -h -o %i 2>/dev/null) ]] && break
          sleep 0.5
        done
      fi
    fi
    stop_pid "$SLURMD_PID" slurmd
    stop_pid "$CTLD_PID" slurmctld
    stop_pid "$MUNGED_PID" munged
  fi
  if [[ -e $BACKUP_CONF ]]; then
    log "restoring $ETC_CONF from $BACKUP_CONF"
    mv -f "$BACKUP_CONF" "$ETC_CONF"
  elif grep -qxsF "$MARKER" "$ETC_CONF"; then
    rm -f "$ETC_CONF"
  fi
  if ((have_state)); then
    rm -rf -- "$STATE_DIR"
  fi
  log "stopped"
}

cmd_status() {
  if ! command -v sinfo >/dev/null 2>&1; then
    echo "$PROG: sinfo is not installed" >&2
    return 1
  fi
  if ! live_pid "$CTLD_PID" slurmctld >/dev/null; then
    echo "$PROG: not running (no slurmctld from $STATE_DIR)" >&2
    return 1
  fi
  timeout 10 sinfo || true
  [[ $(node_state) == idle ]]
}

main() {
  if [[ $# -ne 1 ]]; then
    usage
    exit 2
  fi
  case $1 in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  -h | --help | help) usage ;;
  *)
    usage
    exit 2
    ;;
  esac
}

main "$@"
