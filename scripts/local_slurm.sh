#!/usr/bin/env bash
# local_slurm.sh start|stop|status
#
# Installs (if missing) and runs a real single-node SLURM (slurmctld + slurmd +
# munged) on this Debian host, without touching /etc/slurm: the config lives in
# $NORMLAB_SLURM_DIR (default /var/lib/normlab-slurm) and clients find it via
# SLURM_CONF.
#
#   eval "$(./local_slurm.sh start)"   # stdout: only `export SLURM_CONF=...` (and PATH, see sacct)
#   ./local_slurm.sh status             # exit 0 iff sinfo answers
#   ./local_slurm.sh stop               # kill the daemons this script started
#
# Environment knobs:
#   NORMLAB_SLURM_DIR    state/config folder        (default /var/lib/normlab-slurm)
#   NORMLAB_SLURM_START_TIMEOUT  seconds to wait for an idle node (default 60)
#   NORMLAB_SLURMCTLD_PORT / NORMLAB_SLURMD_PORT    (default 6817 / 6818)
#   NORMLAB_SLURM_CRED_EXPIRE  credential lifetime = delay before a requeued
#                        job can restart (default 15 s; Slurm's default is 120)
#
# Everything except the export line goes to stderr.

set -u
set -o pipefail

DIR="${NORMLAB_SLURM_DIR:-/var/lib/normlab-slurm}"
CONF="$DIR/slurm.conf"
TIMEOUT="${NORMLAB_SLURM_START_TIMEOUT:-60}"
CTLD_PORT="${NORMLAB_SLURMCTLD_PORT:-6817}"
SLURMD_PORT="${NORMLAB_SLURMD_PORT:-6818}"
# Credential lifetime; also how long a requeued job waits before it may start
# again (Slurm default 120 s -- far too slow for tests).
CRED_EXPIRE="${NORMLAB_SLURM_CRED_EXPIRE:-15}"
NODE="$(hostname -s)"
MUNGE_KEY=/etc/munge/munge.key
MUNGE_SOCK=/run/munge/munge.socket.2
MUNGED_PID="$DIR/munge/munged.pid"   # dir owned by munge: munged writes it itself
CTLD_PID="$DIR/slurmctld.pid"
SLURMD_PID="$DIR/slurmd.pid"

log() { echo "local_slurm: $*" >&2; }
die() { echo "local_slurm: $*" >&2; exit 1; }

export SLURM_CONF="$CONF"

# ---------------------------------------------------------------- helpers
pid_alive() {  # pid_alive PIDFILE EXPECTED_COMM
    local f="$1" comm="$2" pid
    [ -s "$f" ] || return 1
    pid="$(tr -dc '0-9' <"$f")"
    [ -n "$pid" ] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$comm" ] || return 1
    echo "$pid"
}

sinfo_ok() { timeout 15 sinfo -h >/dev/null 2>&1; }

node_state() { timeout 15 sinfo -h -n "$NODE" -o '%T' 2>/dev/null | head -n1; }

munge_ok() { timeout 10 munge -n 2>/dev/null | timeout 10 unmunge >/dev/null 2>&1; }

stop_pidfile() {  # stop_pidfile PIDFILE COMM
    local f="$1" comm="$2" pid i
    if pid="$(pid_alive "$f" "$comm")"; then
        log "stopping $comm (pid $pid)"
        kill -TERM "$pid" 2>/dev/null
        for i in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "$comm did not exit on SIGTERM, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null
            sleep 0.5
        fi
    fi
    rm -f "$f"
}

# serialize concurrent start/stop calls (e.g. parallel test workers).
# NB: daemons are started with 9>&- so they do not inherit (and hold) the lock.
lock() {
    exec 9>"$DIR/.lock" || die "cannot open $DIR/.lock"
    flock -w 300 9 || die "timed out waiting for $DIR/.lock (another start/stop running?)"
}

# ---------------------------------------------------------------- install
ensure_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
       command -v sinfo >/dev/null && command -v munged >/dev/null; then
        return 0
    fi
    command -v apt-get >/dev/null || die "slurm/munge not installed and apt-get is not available"
    log "installing slurm-wlm munge via apt-get (this takes a minute)"
    export DEBIAN_FRONTEND=noninteractive
    # Keep maintainer scripts from starting daemons (we start our own).
    local prc=/usr/sbin/policy-rc.d made_prc=0
    if [ ! -e "$prc" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$prc" && chmod 755 "$prc" && made_prc=1
    fi
    local rc=0
    if ! apt-get install -y -q slurm-wlm munge >"$DIR/apt-install.log" 2>&1; then
        log "apt-get install failed once, retrying after apt-get update"
        apt-get update -q >>"$DIR/apt-install.log" 2>&1
        apt-get install -y -q slurm-wlm munge >>"$DIR/apt-install.log" 2>&1 || rc=$?
    fi
    [ "$made_prc" = 1 ] && rm -f "$prc"
    [ "$rc" = 0 ] || die "apt-get install slurm-wlm munge failed (see $DIR/apt-install.log)"
    command -v slurmctld >/dev/null && command -v munged >/dev/null ||
        die "apt-get install finished but slurmctld/munged are still missing"
}

# ---------------------------------------------------------------- munge
ensure_munge() {
    getent passwd munge >/dev/null || die "user 'munge' does not exist (munge package broken?)"
    install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
    install -d -o munge -g munge -m 0711 /var/lib/munge
    install -d -o munge -g munge -m 0755 /run/munge
    if [ ! -s "$MUNGE_KEY" ]; then
        log "creating munge key $MUNGE_KEY"
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$MUNGE_KEY" --force >&2 ||
                dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
        fi
    fi
    # munged refuses keys readable by others / not owned by its user.
    chown munge:munge "$MUNGE_KEY"
    chmod 0400 "$MUNGE_KEY"

    if munge_ok; then
        return 0   # ours (from pid file) or someone else's; either way usable
    fi
    # A stale socket or pid file from a dead munged blocks a new one.
    rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock" /run/munge/munged.pid 2>/dev/null
    log "starting munged"
    install -d -o munge -g munge -m 0755 "$DIR/munge"
    rm -f "$MUNGED_PID"
    runuser -u munge -- munged --pid-file="$MUNGED_PID" \
        --socket="$MUNGE_SOCK" --key-file="$MUNGE_KEY" 9>&- >&2 2>>"$DIR/munged.err" ||
        die "munged failed to start (see $DIR/munged.err, /var/log/munge/munged.log)"
    local i
    for i in $(seq 1 50); do munge_ok && break; sleep 0.2; done
    munge_ok || die "munged started but munge -n | unmunge fails"
}

# ---------------------------------------------------------------- config
write_conf() {
    local cpus mem_total_mb margin real_mem
    cpus="$(OMP_NUM_THREADS= OMP_THREAD_LIMIT= nproc)"  # nproc obeys OMP_NUM_THREADS: not here
    mem_total_mb=$(( $(awk '/^MemTotal:/{print $2}' /proc/meminfo) / 1024 ))
    margin=$(( mem_total_mb / 10 ))
    [ "$margin" -lt 512 ] && margin=512
    real_mem=$(( mem_total_mb - margin ))
    [ "$real_mem" -lt 256 ] && real_mem=256
    local tmp="$CONF.tmp.$$"
    cat >"$tmp" <<EOF
# Generated by local_slurm.sh -- single-node test cluster. Do not edit by hand.
ClusterName=normlab
SlurmctldHost=$NODE
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
AuthInfo=cred_expire=$CRED_EXPIRE
CredType=cred/munge
SlurmUser=root
SlurmdUser=root

StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info

ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
PreemptType=preempt/none
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
LaunchParameters=use_interactive_step

ReturnToService=2
JobRequeue=1
MessageTimeout=10
SlurmctldTimeout=30
SlurmdTimeout=60
KillWait=30
InactiveLimit=0
MinJobAge=600
Waittime=0
SchedulerParameters=bf_interval=5
DefMemPerCPU=1024

NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$real_mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    if [ -f "$CONF" ] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
    else
        CONF_CHANGED=1
        mv -f "$tmp" "$CONF"
        log "wrote $CONF (CPUs=$cpus RealMemory=${real_mem}MB)"
    fi
}

# ---------------------------------------------------------------- daemons
start_daemons() {
    if ! pid_alive "$CTLD_PID" slurmctld >/dev/null; then
        log "starting slurmctld"
        slurmctld -f "$CONF" 9>&- >>"$DIR/log/slurmctld.stderr" 2>&1 ||
            die "slurmctld failed to start (see $DIR/log/slurmctld.log)"
    fi
    if ! pid_alive "$SLURMD_PID" slurmd >/dev/null; then
        log "starting slurmd"
        slurmd -f "$CONF" 9>&- >>"$DIR/log/slurmd.stderr" 2>&1 ||
            die "slurmd failed to start (see $DIR/log/slurmd.log)"
    fi
}

wait_idle() {
    local deadline=$(( $(date +%s) + TIMEOUT )) st last_resume=0 now
    while :; do
        now=$(date +%s)
        st="$(node_state)"
        case "$st" in
            idle|idle~|mixed|allocated|completing) return 0 ;;
            down*|drain*|fail*|*drain|inval*)
                if [ $(( now - last_resume )) -ge 5 ]; then
                    log "node $NODE is '$st', resuming"
                    timeout 15 scontrol update nodename="$NODE" state=resume >&2 2>&1 || true
                    last_resume=$now
                fi ;;
        esac
        if [ "$now" -ge "$deadline" ]; then
            log "node $NODE not idle after ${TIMEOUT}s (state '${st:-no answer}'); see $DIR/log/"
            return 1
        fi
        # daemons died?
        pid_alive "$CTLD_PID" slurmctld >/dev/null || sleep 0.5
        sleep 1
    done
}

# sacct without accounting: the local SLURM runs without slurmdbd
# (AccountingStorageType=accounting_storage/none), but submitit polls `sacct` for job states
# (without one, a job that ends with no result would be waited for forever). This stand-in answers
# submitit's `sacct -o JobID,State,NodeList --parsable2 -j ID...` from `scontrol show job`
# (jobs stay there MinJobAge=600 s). `start` prints PATH with it first.
write_sacct_shim() {
    mkdir -p "$DIR/bin"
    cat >"$DIR/bin/sacct" <<'SHIM'
#!/usr/bin/env bash
# Minimal stand-in for `sacct` when AccountingStorageType=accounting_storage/none.
# Supports what submitit's SlurmInfoWatcher calls:
#   sacct -o JobID,State,NodeList --parsable2 -j ID [-j ID ...]
# Data comes from `scontrol show job -o` (jobs vanish after MinJobAge=600 s).
ids=()
while [ $# -gt 0 ]; do
  case "$1" in
    -j|--jobs) ids+=("${2//,/ }"); shift 2 ;;
    -j*) ids+=("${1#-j}"); shift ;;
    --jobs=*) ids+=("${1#--jobs=}"); shift ;;
    *) shift ;;
  esac
done
echo "JobID|State|NodeList"
for id in ${ids[@]}; do
  scontrol show job -o "$id" 2>/dev/null | while read -r line; do
    jid=$(sed -n 's/.*\bJobId=\([0-9]*\).*/\1/p' <<<"$line")
    aj=$(sed -n 's/.*\bArrayJobId=\([0-9]*\).*/\1/p' <<<"$line")
    at=$(sed -n 's/.*\bArrayTaskId=\([0-9]*\).*/\1/p' <<<"$line")
    st=$(sed -n 's/.*\bJobState=\([A-Z_]*\).*/\1/p' <<<"$line")
    nl=$(sed -n 's/.*\bNodeList=\([^ ]*\).*/\1/p' <<<"$line")
    [ -n "$aj" ] && [ -n "$at" ] && jid="${aj}_${at}"
    echo "$jid|$st|${nl/(null)/None assigned}"
  done
done
exit 0
SHIM
    chmod 0755 "$DIR/bin/sacct"
}

# ---------------------------------------------------------------- commands
cmd_start() {
    [ "$(id -u)" = 0 ] || die "must run as root (need to install packages and start munged/slurmd)"
    mkdir -p "$DIR" || die "cannot create $DIR"
    lock
    ensure_packages
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    chmod 0755 "$DIR" "$DIR/state" "$DIR/spool" "$DIR/log"
    ensure_munge
    CONF_CHANGED=0
    write_conf
    if [ "$CONF_CHANGED" = 1 ]; then
        # daemons running with an older config: restart them (running jobs survive)
        stop_pidfile "$SLURMD_PID" slurmd
        stop_pidfile "$CTLD_PID" slurmctld
    fi
    start_daemons
    wait_idle || exit 1
    write_sacct_shim
    echo "export SLURM_CONF=$CONF"
    case ":$PATH:" in *":$DIR/bin:"*) ;; *) echo "export PATH=$DIR/bin:\$PATH" ;; esac
}

cmd_stop() {
    [ -d "$DIR" ] && lock
    stop_pidfile "$SLURMD_PID" slurmd
    stop_pidfile "$CTLD_PID" slurmctld
    stop_pidfile "$MUNGED_PID" munged
    # slurmstepd children of killed jobs may linger briefly; report them.
    local left
    left="$(ps -eo pid=,comm= | awk '$2 ~ /^(slurmctld|slurmd|slurmstepd)$/' )"
    [ -n "$left" ] && log "still running (not started via our pid files?): $left"
    return 0
}

cmd_status() {
    command -v sinfo >/dev/null || exit 1
    [ -f "$CONF" ] || exit 1
    if sinfo_ok; then
        timeout 15 sinfo >&2 2>&1
        exit 0
    fi
    exit 1
}

case "${1:-}" in
    start)  cmd_start ;;
    stop)   cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
