#!/usr/bin/env bash
# Bring a real single-node SLURM cluster (with slurmdbd + MariaDB job accounting) up/down on this
# machine.  Debian 12, run as root, no systemd.  See docs/slurm.md.
#
#   scripts/slurm_local.sh up       # install (if needed), configure, start, wait for an idle node
#   scripts/slurm_local.sh down     # scancel everything, stop all daemons (harmless if already down)
#   scripts/slurm_local.sh status   # daemon pids / alive, sinfo
#
# Tunables (environment): QDIFF_SLURM_CPUS (default 8, advertised CPUs; config_overrides lets this
# exceed the real core count), QDIFF_SLURM_MEM_MB (default 75% of MemTotal, rounded down to GiB),
# QDIFF_SLURM_TIMEOUT (seconds to wait for each daemon / the node, default 90).
set -euo pipefail

CLUSTER=qdiff
PARTITION=debug
ACCOUNT=qdiff
DB_NAME=slurm_acct_db
DB_USER=slurm
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd slurm-wlm-mysql-plugin mariadb-server)

SLURM_ETC=/etc/slurm
SLURM_CONF=$SLURM_ETC/slurm.conf
SLURMDBD_CONF=$SLURM_ETC/slurmdbd.conf
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm
STATE_DIR=/var/lib/slurm
MUNGE_RUN=/run/munge
MUNGE_KEY=/etc/munge/munge.key
MYSQL_RUN=/run/mysqld
MYSQL_DATA=/var/lib/mysql
MYSQL_SOCK=$MYSQL_RUN/mysqld.sock

PID_MUNGED=$MUNGE_RUN/munged.pid
PID_MARIADBD=$MYSQL_RUN/mariadbd.pid
PID_SLURMDBD=$RUN_DIR/slurmdbd.pid
PID_SLURMCTLD=$RUN_DIR/slurmctld.pid
PID_SLURMD=$RUN_DIR/slurmd.pid

LOG_MUNGED=/var/log/munge/munged.log   # munged refuses a log dir not owned by munge/root
LOG_MARIADBD=$LOG_DIR/mariadbd.log
LOG_SLURMDBD=$LOG_DIR/slurmdbd.log
LOG_SLURMCTLD=$LOG_DIR/slurmctld.log
LOG_SLURMD=$LOG_DIR/slurmd.log

TIMEOUT=${QDIFF_SLURM_TIMEOUT:-90}
NODE=$(hostname -s)

log() { printf '[slurm_local] %s\n' "$*" >&2; }
die() { printf '[slurm_local] ERROR: %s\n' "$*" >&2; exit 1; }
# die_log LOGFILE MESSAGE: fail and show the end of the daemon log that explains it.
die_log() {
    local f=$1; shift
    printf '[slurm_local] ERROR: %s\n' "$*" >&2
    if [[ -f $f ]]; then
        printf '[slurm_local] ---- last lines of %s ----\n' "$f" >&2
        tail -n 30 "$f" >&2 || true
        printf '[slurm_local] ---- end of %s ----\n' "$f" >&2
    else
        printf '[slurm_local] (no log file %s)\n' "$f" >&2
    fi
    exit 1
}

# ---------------------------------------------------------------- process helpers
# running PID: the process exists and is not a zombie (pid 1 here reaps orphans only after a few
# seconds, so 'kill -0' alone reports a killed daemon as alive).
running() {
    local st
    st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $st && $st != Z && $st != X ]]
}

# pid_of NAME PIDFILE: print the pid of the running daemon NAME (exact process name), preferring
# its pid file, falling back to an exact-name lookup (daemon started without our pid file).
pid_of() {
    local name=$1 pidfile=$2 pid=""
    if [[ -s $pidfile ]]; then
        pid=$(tr -dc '0-9' <"$pidfile" || true)
        if [[ -n $pid ]] && running "$pid" \
            && [[ $(cat "/proc/$pid/comm" 2>/dev/null || true) == "$name" ]]; then
            echo "$pid"; return 0
        fi
    fi
    for pid in $(pgrep -x "$name" 2>/dev/null || true); do
        running "$pid" && { echo "$pid"; return 0; }
    done
    return 1
}
alive() { pid_of "$1" "$2" >/dev/null; }

# stop_daemon NAME PIDFILE: SIGTERM, wait up to 30 s, then SIGKILL.
stop_daemon() {
    local name=$1 pidfile=$2 pid i
    if ! pid=$(pid_of "$name" "$pidfile"); then
        log "$name: not running"
        rm -f "$pidfile"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 300; i++)); do
        running "$pid" || break
        sleep 0.1
    done
    if running "$pid"; then
        log "$name (pid $pid) did not exit after 30 s of SIGTERM; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do running "$pid" || break; sleep 0.1; done
    fi
    rm -f "$pidfile"
    log "$name (pid $pid): stopped"
}

# wait_for DAEMON PIDFILE LOGFILE MESSAGE CMD...: poll CMD every 0.25 s until it succeeds; fail
# after $TIMEOUT s, or as soon as DAEMON has been gone for 3 s (it died: show its log at once).
wait_for() {
    local name=$1 pidfile=$2 logf=$3 msg=$4; shift 4
    local deadline=$((SECONDS + TIMEOUT)) gone=0
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die_log "$logf" "timed out after ${TIMEOUT}s waiting for $msg"
        if alive "$name" "$pidfile"; then gone=0; else gone=$((gone + 1)); fi
        ((gone < 12)) || die_log "$logf" "$name exited while waiting for $msg"
        sleep 0.25
    done
}
tcp_open() { timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }
have_cmd() { command -v "$1" >/dev/null 2>&1; }

# ---------------------------------------------------------------- install
install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        if [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true) != "install ok installed" ]]; then
            missing+=("$p")
        fi
    done
    ((${#missing[@]} == 0)) && return 0
    log "installing Debian packages: ${missing[*]}"
    # apt-get update only when the package lists cannot provide every missing package.
    local need_update=0
    for p in "${missing[@]}"; do
        local cand
        cand=$(apt-cache policy "$p" 2>/dev/null | awk '/Candidate:/ {print $2}')
        if [[ -z $cand || $cand == "(none)" ]]; then need_update=1; break; fi
    done
    if ((need_update)); then
        log "apt-get update (package lists lack: ${missing[*]})"
        apt-get update -q >/dev/null || die "apt-get update failed"
    fi
    # Never let package scripts start daemons (no systemd here; we start them ourselves).
    local made_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    local rc=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" \
        >"/tmp/slurm_local.apt.log" 2>&1 || rc=$?
    ((made_policy)) && rm -f /usr/sbin/policy-rc.d
    if ((rc != 0)); then
        tail -n 30 /tmp/slurm_local.apt.log >&2 || true
        die "apt-get install failed (rc=$rc); full log in /tmp/slurm_local.apt.log"
    fi
}

ensure_users_and_dirs() {
    getent group slurm >/dev/null || groupadd --system slurm
    getent passwd slurm >/dev/null \
        || useradd --system --gid slurm --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin slurm
    getent passwd munge >/dev/null || die "user 'munge' is missing (the munge package creates it)"
    getent passwd mysql >/dev/null || die "user 'mysql' is missing (the mariadb-server package creates it)"

    install -d -m 755 -o slurm -g slurm "$LOG_DIR" "$RUN_DIR" "$STATE_DIR" "$STATE_DIR/slurmctld"
    install -d -m 755 -o root -g root "$STATE_DIR/slurmd" "$SLURM_ETC"
    install -d -m 755 -o munge -g munge "$MUNGE_RUN"
    install -d -m 700 -o munge -g munge /etc/munge /var/lib/munge
    install -d -m 755 -o mysql -g mysql "$MYSQL_RUN"
    install -d -m 700 -o munge -g munge /var/log/munge
    touch "$LOG_MUNGED" && chown munge:munge "$LOG_MUNGED"
    touch "$LOG_MARIADBD" && chown mysql:mysql "$LOG_MARIADBD"
    local f
    for f in "$LOG_SLURMDBD" "$LOG_SLURMCTLD"; do touch "$f" && chown slurm:slurm "$f"; done
    touch "$LOG_SLURMD"

    if [[ ! -s $MUNGE_KEY ]]; then
        log "creating munge key $MUNGE_KEY"
        if have_cmd mungekey; then
            mungekey --create --keyfile="$MUNGE_KEY" --force
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
        fi
    fi
    chown munge:munge "$MUNGE_KEY"
    chmod 400 "$MUNGE_KEY"
}

# ---------------------------------------------------------------- configuration
# write_if_changed FILE MODE OWNER CONTENT: returns 0 if the file content changed.
write_if_changed() {
    local f=$1 mode=$2 owner=$3 content=$4 tmp
    tmp=$(mktemp "$f.XXXXXX")
    printf '%s\n' "$content" >"$tmp"
    chmod "$mode" "$tmp"
    chown "$owner" "$tmp"
    if [[ -f $f ]] && cmp -s "$tmp" "$f"; then
        rm -f "$tmp"
        chmod "$mode" "$f"; chown "$owner" "$f"
        return 1
    fi
    mv -f "$tmp" "$f"
    log "wrote $f"
    return 0
}

CONFIG_CHANGED=0
write_configs() {
    local cpus=${QDIFF_SLURM_CPUS:-8}
    local mem_mb=${QDIFF_SLURM_MEM_MB:-}
    if [[ -z $mem_mb ]]; then
        local total_kb
        total_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
        mem_mb=$((total_kb * 3 / 4 / 1024 / 1024 * 1024))
        ((mem_mb >= 1024)) || mem_mb=$((total_kb / 2 / 1024))
    fi
    [[ $cpus =~ ^[1-9][0-9]*$ ]] || die "QDIFF_SLURM_CPUS must be a positive integer (got '$cpus')"
    [[ $mem_mb =~ ^[1-9][0-9]*$ ]] || die "QDIFF_SLURM_MEM_MB must be a positive integer (got '$mem_mb')"
    MEM_MB=$mem_mb
    CPUS=$cpus

    local slurm_conf
    slurm_conf=$(cat <<EOF
# Written by scripts/slurm_local.sh (qdiff). Single-node local cluster; edits are overwritten by 'up'.
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Short credential lifetime: a requeued job may restart after cred_expire+1 s (default 120+1).
AuthInfo=cred_expire=10
MpiDefault=none
MailProg=/bin/true
# No cgroups on this machine.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# Real job accounting (sacct) through slurmdbd + MariaDB.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=5
JobRequeue=1
KillWait=10
MinJobAge=3600
ReturnToService=2
InactiveLimit=0
Waittime=0
StateSaveLocation=$STATE_DIR/slurmctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldPidFile=$PID_SLURMCTLD
SlurmdPidFile=$PID_SLURMD
SlurmctldLogFile=$LOG_SLURMCTLD
SlurmdLogFile=$LOG_SLURMD
SlurmctldDebug=info
SlurmdDebug=info
# Advertise more CPUs than the machine has so several 1-CPU jobs can run at once.
SlurmdParameters=config_overrides
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)
    if write_if_changed "$SLURM_CONF" 644 root:root "$slurm_conf"; then CONFIG_CHANGED=1; fi

    # Keep the existing database password (if any) so repeated 'up' does not change the file.
    local pass=""
    if [[ -f $SLURMDBD_CONF ]]; then
        pass=$(sed -n 's/^StoragePass=//p' "$SLURMDBD_CONF" | head -n 1)
    fi
    if [[ -z $pass ]]; then
        pass=$(head -c 64 /dev/urandom | base64 -w0 | tr -dc 'A-Za-z0-9' | cut -c1-24)
    fi
    DB_PASS=$pass
    local dbd_conf
    dbd_conf=$(cat <<EOF
# Written by scripts/slurm_local.sh (qdiff).
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=slurm
DebugLevel=info
LogFile=$LOG_SLURMDBD
PidFile=$PID_SLURMDBD
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=$DB_USER
StoragePass=$pass
StorageLoc=$DB_NAME
EOF
)
    if write_if_changed "$SLURMDBD_CONF" 600 slurm:slurm "$dbd_conf"; then CONFIG_CHANGED=1; fi
}

# ---------------------------------------------------------------- daemons
start_munged() {
    if alive munged "$PID_MUNGED"; then return 0; fi
    log "starting munged"
    rm -f "$PID_MUNGED"
    runuser -u munge -- /usr/sbin/munged --pid-file="$PID_MUNGED" --log-file="$LOG_MUNGED" \
        </dev/null 9>&- >>"$LOG_MUNGED" 2>&1 || die_log "$LOG_MUNGED" "munged failed to start"
    wait_for munged "$PID_MUNGED" "$LOG_MUNGED" "munge to answer (munge -n | unmunge)" \
        bash -c 'munge -n | unmunge'
}

mariadb_ping() { mariadb-admin --protocol=socket --socket="$MYSQL_SOCK" -uroot ping; }

start_mariadbd() {
    if [[ ! -d $MYSQL_DATA/mysql ]]; then
        log "initialising MariaDB data directory $MYSQL_DATA"
        install -d -m 755 -o mysql -g mysql "$MYSQL_DATA"
        mariadb-install-db --user=mysql --datadir="$MYSQL_DATA" --auth-root-authentication-method=socket \
            --skip-test-db >>"$LOG_MARIADBD" 2>&1 || die_log "$LOG_MARIADBD" "mariadb-install-db failed"
    fi
    if ! alive mariadbd "$PID_MARIADBD"; then
        log "starting mariadbd"
        rm -f "$PID_MARIADBD"
        setsid /usr/sbin/mariadbd --user=mysql --datadir="$MYSQL_DATA" --pid-file="$PID_MARIADBD" \
            --socket="$MYSQL_SOCK" --bind-address=127.0.0.1 --log-error="$LOG_MARIADBD" \
            --innodb-buffer-pool-size=256M --innodb-lock-wait-timeout=900 \
            </dev/null 9>&- >>"$LOG_MARIADBD" 2>&1 &
        disown || true
    fi
    wait_for mariadbd "$PID_MARIADBD" "$LOG_MARIADBD" "mariadbd to answer on $MYSQL_SOCK" mariadb_ping
    # Accounting database + user (idempotent). SQL goes through stdin so the password is not in ps.
    mariadb --protocol=socket --socket="$MYSQL_SOCK" -uroot <<EOF || die_log "$LOG_MARIADBD" "creating the accounting database failed"
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL PRIVILEGES ON $DB_NAME.* TO '$DB_USER'@'localhost';
FLUSH PRIVILEGES;
EOF
}

start_slurmdbd() {
    if ! alive slurmdbd "$PID_SLURMDBD"; then
        log "starting slurmdbd"
        rm -f "$PID_SLURMDBD"
        /usr/sbin/slurmdbd </dev/null 9>&- >>"$LOG_SLURMDBD" 2>&1 || die_log "$LOG_SLURMDBD" "slurmdbd failed to start"
    fi
    wait_for slurmdbd "$PID_SLURMDBD" "$LOG_SLURMDBD" "slurmdbd to accept connections on TCP 6819" tcp_open 6819
}

register_cluster() {
    local out
    out=$(sacctmgr -n -P show cluster format=Cluster 2>&1) \
        || die_log "$LOG_SLURMDBD" "sacctmgr cannot talk to slurmdbd: $out"
    if ! grep -qx "$CLUSTER" <<<"$out"; then
        log "registering cluster '$CLUSTER' in the accounting database"
        sacctmgr -i add cluster "$CLUSTER" >/dev/null || die_log "$LOG_SLURMDBD" "sacctmgr add cluster failed"
    fi
    if [[ -z $(sacctmgr -n -P show account "$ACCOUNT" format=Account 2>/dev/null) ]]; then
        sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER" Description="qdiff experiments" \
            Organization=qdiff >/dev/null || die_log "$LOG_SLURMDBD" "sacctmgr add account failed"
    fi
    # root gets an association in the qdiff account (its default account stays 'root').
    if [[ -z $(sacctmgr -n -P show assoc cluster="$CLUSTER" account="$ACCOUNT" user=root format=User 2>/dev/null) ]]; then
        sacctmgr -i add user root Account="$ACCOUNT" Cluster="$CLUSTER" >/dev/null \
            || die_log "$LOG_SLURMDBD" "sacctmgr add user failed"
    fi
}

start_slurmctld() {
    if ! alive slurmctld "$PID_SLURMCTLD"; then
        log "starting slurmctld"
        rm -f "$PID_SLURMCTLD"
        /usr/sbin/slurmctld </dev/null 9>&- >>"$LOG_SLURMCTLD" 2>&1 || die_log "$LOG_SLURMCTLD" "slurmctld failed to start"
    fi
    wait_for slurmctld "$PID_SLURMCTLD" "$LOG_SLURMCTLD" "slurmctld to answer (scontrol ping)" \
        bash -c 'scontrol ping | grep -q "is UP"'
}

start_slurmd() {
    if ! alive slurmd "$PID_SLURMD"; then
        log "starting slurmd"
        rm -f "$PID_SLURMD"
        /usr/sbin/slurmd </dev/null 9>&- >>"$LOG_SLURMD" 2>&1 || die_log "$LOG_SLURMD" "slurmd failed to start"
    fi
}

node_state() { sinfo -h -n "$NODE" -o %t 2>/dev/null | head -n 1 | tr -d '*~#!%$@^-'; }

wait_node_ready() {
    local deadline=$((SECONDS + TIMEOUT)) st="" resumed=0 gone=0
    while :; do
        if alive slurmd "$PID_SLURMD"; then gone=0; else gone=$((gone + 1)); fi
        ((gone < 12)) || die_log "$LOG_SLURMD" "slurmd exited while waiting for node $NODE to become idle"
        st=$(node_state || true)
        case $st in
            idle | mix | alloc | comp) return 0 ;;
            drain | drng | down)
                # e.g. left down by an unclean stop: resume once, ReturnToService=2 does the rest.
                if ((!resumed)) && alive slurmd "$PID_SLURMD"; then
                    log "node $NODE is '$st'; resuming it"
                    scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
                    resumed=1
                fi
                ;;
        esac
        if ((SECONDS >= deadline)); then
            alive slurmd "$PID_SLURMD" || die_log "$LOG_SLURMD" "slurmd died; node $NODE state '${st:-?}'"
            die_log "$LOG_SLURMD" "timed out after ${TIMEOUT}s waiting for node $NODE to become idle (state '${st:-?}'); see also $LOG_SLURMCTLD"
        fi
        sleep 0.25
    done
}

# ---------------------------------------------------------------- commands
cmd_up() {
    [[ $(id -u) -eq 0 ]] || die "must run as root"
    local t0=$SECONDS
    install_packages
    ensure_users_and_dirs
    write_configs
    if ((CONFIG_CHANGED)) && { alive slurmctld "$PID_SLURMCTLD" || alive slurmd "$PID_SLURMD" || alive slurmdbd "$PID_SLURMDBD"; }; then
        log "configuration changed while daemons were running: restarting slurmd, slurmctld, slurmdbd"
        stop_daemon slurmd "$PID_SLURMD"
        stop_daemon slurmctld "$PID_SLURMCTLD"
        stop_daemon slurmdbd "$PID_SLURMDBD"
    fi
    start_munged
    start_mariadbd
    start_slurmdbd
    register_cluster
    start_slurmctld
    start_slurmd
    wait_node_ready
    local st
    st=$(node_state || true)
    echo "slurm up: cluster=$CLUSTER node=$NODE state=$st partition=$PARTITION cpus=$CPUS mem=${MEM_MB}MB accounting=slurmdbd+mariadb logs=$LOG_DIR ($((SECONDS - t0))s)"
}

cmd_down() {
    [[ $(id -u) -eq 0 ]] || die "must run as root"
    if alive slurmctld "$PID_SLURMCTLD" && have_cmd squeue; then
        local jobs
        jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ' || true)
        if [[ -n ${jobs// /} ]]; then
            log "cancelling jobs: $jobs"
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            local deadline=$((SECONDS + 30))
            while [[ -n $(squeue -h -o %A 2>/dev/null || true) ]] && ((SECONDS < deadline)); do sleep 0.25; done
            [[ -z $(squeue -h -o %A 2>/dev/null || true) ]] || log "some jobs still listed after 30 s; stopping anyway"
        fi
    fi
    stop_daemon slurmd "$PID_SLURMD"
    stop_daemon slurmctld "$PID_SLURMCTLD"
    stop_daemon slurmdbd "$PID_SLURMDBD"
    stop_daemon mariadbd "$PID_MARIADBD"
    stop_daemon munged "$PID_MUNGED"
    # Job steps survive slurmd; anything left of a slurmstepd is an orphan now.
    local p
    for p in $(pgrep -x slurmstepd 2>/dev/null || true); do
        log "killing leftover slurmstepd $p"; kill -KILL "$p" 2>/dev/null || true
    done
    echo "slurm down"
}

cmd_status() {
    local name pidfile pid rc=0
    for name in munged mariadbd slurmdbd slurmctld slurmd; do
        case $name in
            munged) pidfile=$PID_MUNGED ;; mariadbd) pidfile=$PID_MARIADBD ;;
            slurmdbd) pidfile=$PID_SLURMDBD ;; slurmctld) pidfile=$PID_SLURMCTLD ;; slurmd) pidfile=$PID_SLURMD ;;
        esac
        if pid=$(pid_of "$name" "$pidfile"); then
            printf '%-10s pid=%-8s alive\n' "$name" "$pid"
        else
            printf '%-10s pid=%-8s DOWN\n' "$name" "-"; rc=1
        fi
    done
    if have_cmd sinfo && alive slurmctld "$PID_SLURMCTLD"; then
        sinfo || rc=1
    else
        echo "sinfo: slurmctld not running"
    fi
    return $rc
}

# Serialise concurrent up/down (CI + a developer, two test sessions...). Daemons are started with
# fd 9 closed so that they do not inherit (and hold) the lock.
lock() {
    { exec 9>/run/lock/qdiff-slurm-local.lock; } 2>/dev/null || exec 9>/tmp/qdiff-slurm-local.lock
    flock -w 300 9 || die "another 'scripts/slurm_local.sh up/down' is still running (waited 300 s for its lock)"
}

case ${1:-} in
    up) lock; cmd_up ;;
    down) lock; cmd_down ;;
    status) cmd_status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
