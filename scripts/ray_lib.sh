# shellcheck shell=bash
# Functions shared by the scripts that run on the cluster. Sourced, not run.
# Every script first sources the cluster's env file, which the flow writes
# with each value shell-quoted: AR_CLUSTER_ID, AR_CLUSTER_DIR, AR_NODE_TMP,
# AR_PYTHON, AR_RAY, AR_NUM_CPUS, AR_NUM_GPUS, AR_MEMORY, AR_OBJECT_STORE,
# AR_DASHBOARD_HOST, AR_DASHBOARD_PORT, AR_HEARTBEAT_TIMEOUT, AR_NODE_TMP_NAME,
# AR_METRICS, RAY_AUTH_MODE...

ar_log() { printf '%s [%s] %s\n' "$(date +%H:%M:%S)" "$(hostname -s)" "$*" >&2; }

# A node's own address: on the network the user chose (AR_NETWORK_INTERFACE: an
# interface name or a subnet), else looked up from its name; never guessed, and
# loopback is refused because other nodes could not reach it. A node without one
# says so in the cluster's status, which the flow reports with the node's name.
ar_node_ip() {
    local name ip problem
    name="$(hostname)"
    if [ -n "${AR_NETWORK_INTERFACE:-}" ]; then
        if ! ip="$("$AR_PYTHON" "$AR_CLUSTER_DIR/bin/node_ip.py" "$AR_NETWORK_INTERFACE" 2>&1)"; then
            problem="$ip"
            ar_log "$problem"
            printf 'RAY_FAILED=network_interface: %s\n' "$problem" >>"$AR_CLUSTER_DIR/status"
            return 1
        fi
        printf '%s\n' "$ip"
        return 0
    fi
    ip="$(getent ahostsv4 "$name" 2>/dev/null | awk '$1 !~ /^127\./ {print $1; exit}')"
    if [ -z "$ip" ]; then
        ip="$(hostname -I 2>/dev/null | tr ' ' '\n' | awk '/^[0-9.]+$/ && $1 !~ /^127\./ {print; exit}')"
    fi
    if [ -z "$ip" ]; then
        ar_log "no non-loopback IPv4 address found for $name"
        return 1
    fi
    printf '%s\n' "$ip"
}

# Wait (bounded by AR_ENVIRONMENT_WAIT seconds) for the flow's environment.env, then
# source it: AR_PYTHON and AR_RAY. The flow removing the cluster, asking it to stop or
# going silent ends the wait too.
ar_wait_for_environment() {
    local waited=0 reason
    while [ ! -e "$AR_CLUSTER_DIR/environment.env" ]; do
        # the stop reasons every 2 s, not every look: a shared filesystem's metadata server
        # hears from every node of the cluster while it starts
        if [ $((waited % 20)) = 0 ]; then
            reason="$(ar_stop_reason)"
            if [ -n "$reason" ]; then
                ar_log "stopped while waiting for the environment: $reason"
                return 1
            fi
        fi
        if [ "$waited" -ge "$((${AR_ENVIRONMENT_WAIT:-1800} * 10))" ]; then
            echo "RAY_FAILED=the Python environment was not ready after ${AR_ENVIRONMENT_WAIT:-1800}s" >>"$AR_CLUSTER_DIR/status"
            return 1
        fi
        [ "$waited" -gt 0 ] || ar_log "waiting for the flow to finish the Python environment"
        sleep 0.1
        waited=$((waited + 1))
    done
    # shellcheck disable=SC1091
    . "$AR_CLUSTER_DIR/environment.env"
}

# Free ports for one Ray node, held open together while chosen so they are
# distinct: gcs dashboard client node_manager object_manager metrics
# agent_http agent_grpc runtime_env worker_min worker_max dashboard_metrics
# autoscaler_metrics. Drawn at random (the OS's CSPRNG), not the kernel's next free one:
# a cluster's ports say nothing about the next cluster's, so nobody can listen there first
# by guessing (ar_verify_ports still makes sure nobody did).
ar_free_ports() {
    "$AR_PYTHON" - "$AR_DASHBOARD_PORT" <<'PY'
import random, socket, sys

rng = random.SystemRandom()
held = []
def grab(port):
    s = socket.socket()
    try:
        s.bind(("", port))
    except OSError:
        s.close()
        return None
    held.append(s)
    return s.getsockname()[1]

def grab_random():
    for _ in range(1000):
        port = grab(rng.randrange(30000, 61000))
        if port:
            return port
    sys.exit("no free port")

dashboard = (int(sys.argv[1]) and grab(int(sys.argv[1]))) or grab_random()
ports = [grab_random(), dashboard] + [grab_random() for _ in range(7)]
# Workers need a contiguous range: try random bases below the others.
for _ in range(200):
    base = rng.randrange(12000, 30000, 50)
    mark = len(held)
    if all(grab(p) for p in range(base, base + 50)):  # stops at the first busy port
        ports += [base, base + 49]
        break
    for s in held[mark:]:
        s.close()
    del held[mark:]
else:
    sys.exit("no free worker port range")
ports += [grab_random(), grab_random()]
print(*ports)
PY
}

# Wait until this node's Ray listens on the given ports and nobody else does (any user of
# the host saw them on `ray start`'s command line, and could have listened there first):
# scripts/verify_ports.py, on this host, against this node's own processes. Until it
# passes, nothing is told where the ports are (head.env), so nothing connects to them. A
# port someone else holds is said in the cluster's status (the flow fails now, naming it,
# and a retry takes fresh ports), never waited on.
# usage: ar_verify_ports NAME PGID TMP NAME=PORT... [--watch NAME=PORT[-PORT]...]
ar_verify_ports() {
    local name="$1" pgid="$2" tmp="$3" said status=0
    shift 3
    # in the background: a signal's trap runs at once, not after the check
    local container=()
    [ -z "${AR_CONTAINER_IMAGE:-}" ] || container=(--same-user-is-ours)
    "$AR_PYTHON" "$AR_CLUSTER_DIR/bin/verify_ports.py" --pgid "$pgid" --marker "$tmp/" "${container[@]}" \
        --wait "${AR_PORTS_WAIT:-180}" --stop-file "$AR_CLUSTER_DIR/stop" "$@" >"$tmp/ports.out" 2>&1 &
    wait $! || status=$?
    [ "$status" != 0 ] || return 0
    said="$(tail -n 1 "$tmp/ports.out")"
    ar_log "node $name: ${said:-port check failed (exit $status)}"
    # Ray ended before it listened (verify_ports.py's 3): a worker starts it again (ar_run_node)
    if [ "$status" = 3 ] && [ "${AR_RAY_MAY_START_AGAIN:-0}" = 1 ]; then return "$AR_ENDED_WHILE_STARTING"; fi
    [ -n "$(ar_stop_reason)" ] || printf 'RAY_FAILED=node %s: %s\n' "$name" "${said:-port check failed (exit $status)}" >>"$AR_CLUSTER_DIR/status"
    return 1
}

# This host's short name: what a node's files in the shared cluster dir are keyed by.
ar_host() { hostname -s; }

# A node's private temp root: a fresh 0700 dir with an unpredictable name under
# AR_NODE_TMP, so no other user can create or enter anything of the cluster's in
# advance (Ray makes its temp dir and its own dirs 0777: they live inside this one). The name is
# short (Ray's unix sockets live below it, 107 bytes at most); it is recorded as
# "host path" in nodes/NAME.tmp, which is how this host's sweep finds it.
ar_make_node_tmp() {
    local tmp
    tmp="$(mktemp -d "$AR_NODE_TMP/$AR_NODE_TMP_NAME.XXXXXX")"
    chmod 700 "$tmp"
    if [ ! -O "$tmp" ] || [ -L "$tmp" ]; then ar_log "temp dir $tmp is not ours"; return 1; fi
    printf '%s %s\n' "$(ar_host)" "$tmp" >"$AR_CLUSTER_DIR/nodes/$1.tmp"
    printf '%s\n' "$tmp"
}

# Why this node should stop now (empty: keep going). Every node checks for itself,
# so a node stops from its own host even when nothing can reach it from outside.
# Costs the shared filesystem two or three metadata operations (the heartbeat's stat, which
# also fails once the cluster dir is gone; the stop file; a worker job's removal): for a
# node that starts, or was told to look now; a running node glances (ar_stop_glance).
ar_stop_reason() {
    local beat now
    if ! beat="$(stat -c %Y "$AR_CLUSTER_DIR/heartbeat" 2>/dev/null)"; then
        if [ ! -d "$AR_CLUSTER_DIR" ]; then echo "cluster dir removed"; return 0; fi
        beat=0
    fi
    if [ -e "$AR_CLUSTER_DIR/stop" ]; then echo "stop requested"
    elif [[ "${AR_NODE_NAME:-}" == wjob-* ]] && [ -e "$AR_CLUSTER_DIR/nodes/$AR_NODE_NAME.remove" ]; then
        echo "removed from the cluster (scale --remove or the adaptive loop)"
    elif printf -v now '%(%s)T' -1 && [ $((now - beat)) -gt "$AR_HEARTBEAT_TIMEOUT" ]; then
        echo "no heartbeat from the flow for more than ${AR_HEARTBEAT_TIMEOUT}s (dead-man switch)"
    fi
}

# A running node's periodic look: one metadata operation, the heartbeat's stat. A stop
# request removes the heartbeat (ar_request_stop), so one stat sees a stop, a removed
# cluster dir and a silent flow; only then (or when told to look now, WINCH) the full
# ar_stop_reason runs. A worker job's node also looks for its own removal file (two
# operations, so it glances half as often: ar_glance_every).
ar_stop_glance() {
    local beat now
    if beat="$(stat -c %Y "$AR_CLUSTER_DIR/heartbeat" 2>/dev/null)" && printf -v now '%(%s)T' -1 \
        && [ $((now - beat)) -le "$AR_HEARTBEAT_TIMEOUT" ] \
        && { [[ "${AR_NODE_NAME:-}" != wjob-* ]] || [ ! -e "$AR_CLUSTER_DIR/nodes/$AR_NODE_NAME.remove" ]; }; then
        return 0
    fi
    ar_stop_reason
}

# Ask every node of the cluster to stop: the stop file, and the heartbeat gone (what a
# running node's glance sees). The flow's teardown does the same (tasks/cluster.py).
ar_request_stop() {
    touch "$AR_CLUSTER_DIR/stop" 2>/dev/null || true
    rm -f "$AR_CLUSTER_DIR/heartbeat" 2>/dev/null || true
}

# How often (seconds) a running node glances at the shared cluster dir, beyond its 0.5 s
# loop (which watches its own Ray without the filesystem): one metadata operation per
# glance, 0.17 per second per node at 6 s (issue 34 asks for at most 0.2; 11.6 once). A stop
# reaches a node at its next glance, or at once with WINCH ("look now"), which the flow's
# teardown sends through the scheduler (`scancel --full`, `qsig`; the supervisor's group
# without one). WINCH because its default action is to be ignored: every other process of
# the job that the scheduler signals with it (the user's login shell OpenPBS runs the job
# script under, Ray, sleep) carries on.
AR_LOOK_EVERY="${AR_LOOK_EVERY:-6}"

# Seconds between this node's glances: a worker job's costs two operations (ar_stop_glance),
# so it glances half as often. usage: ar_glance_every NAME
ar_glance_every() {
    case "$1" in wjob-*) echo $((2 * AR_LOOK_EVERY)) ;; *) echo "$AR_LOOK_EVERY" ;; esac
}

# This node's checks (node_check.sh: Ray and Python, temp dir, space, limits, network), before
# `ray start`: every row to <cluster dir>/checks/NAME.rows (`check --on-nodes` reads them); a row
# that fails is said in the cluster's status in the same words, with its fix, and stops the node.
# usage: ar_node_checks NAME
ar_node_checks() {
    local name="$1" rows status=0 _tag check verdict found fix
    mkdir -p "$AR_CLUSTER_DIR/checks"
    rows="$AR_CLUSTER_DIR/checks/$name.rows"
    AR_CHECK_NODE="$name" bash "$AR_CLUSTER_DIR/bin/node_check.sh" >"$rows" 2>&1 || status=$?
    while IFS=$'\t' read -r _tag check verdict found fix; do
        [ "$_tag" = AR_CHECK ] || continue
        case "$verdict" in
            fail)
                ar_log "node check failed: $check: $found; fix: $fix"
                printf 'RAY_FAILED=node check on %s: %s: %s; fix: %s\n' "$(ar_host)" "$check" "$found" "$fix" \
                    >>"$AR_CLUSTER_DIR/status" ;;
            warn) ar_log "node check warning: $check: $found; fix: $fix" ;;
        esac
    done <"$rows"
    return "$status"
}

# Start one Ray node in a process group of its own (exactly this node's processes)
# and watch it until it ends or is told to stop;
# then stop it and remove its temp dir, here, on its own host.
# usage: ar_run_node head|worker NAME
ar_run_node() {
    local role="$1" name="$2" ip host runtime=""
    # this node's name, for ar_stop_reason: a worker job is removed through nodes/NAME.remove
    local AR_NODE_NAME="$name"
    host="$(ar_host)"
    # a node told to stop before it started makes nothing (a worker job that started late)
    if [ -n "$(ar_stop_reason)" ]; then ar_log "node $name not started: $(ar_stop_reason)"; return 0; fi
    # what would break this node, before anything is made (the same rows as `check --on-nodes`)
    ar_node_checks "$name" || return 1
    # the address first: a node without one leaves nothing behind (no temp dir to sweep)
    ip="$(ar_node_ip)" || return 1
    # `check --on-nodes`: the nodes reach each other, then end; no Ray is started
    if [ "${AR_CHECK_ONLY:-0}" = 1 ]; then
        "$AR_PYTHON" "$AR_CLUSTER_DIR/bin/peer_check.py" "$AR_CLUSTER_DIR/checks" "$name" "$ip" \
            "$AR_EXPECTED_NODES" 60 >>"$AR_CLUSTER_DIR/checks/$name.rows" 2>&1 \
            || python3 "$AR_CLUSTER_DIR/bin/peer_check.py" "$AR_CLUSTER_DIR/checks" "$name" "$ip" \
            "$AR_EXPECTED_NODES" 60 >>"$AR_CLUSTER_DIR/checks/$name.rows" 2>&1 || true
        return 0
    fi
    if [ -n "${AR_CONTAINER_IMAGE:-}" ]; then
        runtime="$(ar_container_runtime)" || return 1
    fi
    [ "$role" = worker ] || { ar_start_and_watch_ray "$role" "$name" "$ip" "$runtime"; return; }
    # A worker whose Ray ended while starting starts again, a few times: Ray's raylet waits a
    # fixed 15 s for its dashboard agent and aborts, which many nodes starting at once on busy
    # cores miss (issue 34). A node that fails each time is said in the status, as before.
    local attempt=1 status stop
    while :; do
        status=0
        ar_start_and_watch_ray "$role" "$name" "$ip" "$runtime" "$attempt" || status=$?
        [ "$status" = "$AR_ENDED_WHILE_STARTING" ] || return "$status"
        stop="$(ar_stop_reason)"
        [ -z "$stop" ] || return 1
        if [ "$attempt" -ge "$AR_START_TRIES" ]; then
            printf 'RAY_FAILED=worker %s on %s: Ray ended while starting, %s times; see %s\n' \
                "$name" "$host" "$attempt" "$AR_CLUSTER_DIR/logs/ray-$name.log" >>"$AR_CLUSTER_DIR/status"
            return 1
        fi
        ar_log "worker $name: Ray ended while starting (try $attempt of $AR_START_TRIES): starting it again"
        # spread out over more time the bigger the cluster and the more tries: the nodes that
        # failed together (a cluster's whole first wave, on busy cores) start again a few at a time
        sleep "$((attempt + RANDOM % (${AR_EXPECTED_NODES:-1} / 2 + 2 * attempt + 1)))"
        attempt=$((attempt + 1))
    done
}

# How many times a worker starts Ray before its node is said to have failed, and the status
# ar_start_and_watch_ray returns when Ray ended while starting (nothing said in the status yet)
AR_START_TRIES="${AR_START_TRIES:-6}"
AR_ENDED_WHILE_STARTING=75

# One start of Ray on this node, watched until it ends or is told to stop, then stopped and
# its temp dir removed. A worker's Ray that ended while starting (before the flow found the
# cluster ready: after that it is a lost node, never started again) returns
# AR_ENDED_WHILE_STARTING and says nothing in the status (ar_run_node starts it again).
# usage: ar_start_and_watch_ray head|worker NAME IP RUNTIME [ATTEMPT]
ar_start_and_watch_ray() {
    local role="$1" name="$2" ip="$3" runtime="$4" attempt="${5:-1}" tmp args ports host
    host="$(ar_host)"
    tmp="$(ar_make_node_tmp "$name")"
    read -r -a ports < <(ar_free_ports)
    # Ray makes its temp dir 0777: it is a child of the private dir, never the private dir itself
    # node name: the host's own (the scheduler's name for it), so a node that failed can be excluded by it
    args=(start --block --temp-dir="$tmp/r" --node-ip-address="$ip" --node-name="${AR_RAY_NODE_NAME:-$host}"
        --node-manager-port="${ports[3]}" --object-manager-port="${ports[4]}"
        --metrics-export-port="${ports[5]}" --dashboard-agent-listen-port="${ports[6]}"
        --dashboard-agent-grpc-port="${ports[7]}" --runtime-env-agent-port="${ports[8]}"
        --min-worker-port="${ports[9]}" --max-worker-port="${ports[10]}"
        --disable-usage-stats)
    # Sizes the user set; else what this node's allocation gives (Ray finds the rest itself).
    local cpus="${AR_NUM_CPUS:-${SLURM_CPUS_ON_NODE:-${NCPUS:-}}}"
    # Without a scheduler, the head and its direct workers share one host: each
    # takes its share of the CPUs, so Ray does not count them 1+N times.
    if [ -z "$cpus" ] && [ "${AR_DIRECT_WORKERS:-0}" -gt 0 ]; then
        cpus=$(( $(nproc) / (AR_DIRECT_WORKERS + 1) ))
        [ "$cpus" -ge 1 ] || cpus=1
    fi
    [ -z "$cpus" ] || args+=(--num-cpus="$cpus")
    [ -z "$AR_NUM_GPUS" ] || args+=(--num-gpus="$AR_NUM_GPUS")
    [ -z "$AR_MEMORY" ] || args+=(--memory="$AR_MEMORY")
    [ -z "$AR_OBJECT_STORE" ] || args+=(--object-store-memory="$AR_OBJECT_STORE")
    local launch=("$AR_RAY")
    if [ "$role" = head ]; then
        args+=(--head --port="${ports[0]}" --dashboard-host="$AR_DASHBOARD_HOST"
            --dashboard-port="${ports[1]}" --ray-client-server-port="${ports[2]}")
        # this cluster's own ports, never Ray's fixed 44227/44217 that every cluster on a host shares
        export DASHBOARD_METRIC_PORT="${ports[11]}" AUTOSCALER_METRIC_PORT="${ports[12]}"
        if [ "${AR_METRICS:-0}" != 1 ]; then
            # held on loopback, so Ray's unauthenticated servers there never open
            launch=("$AR_PYTHON" "$AR_CLUSTER_DIR/bin/exec_holding_ports.py" "${ports[11]}" "${ports[12]}" -- "$AR_RAY")
        fi
    else
        # shellcheck disable=SC1091
        . "$AR_CLUSTER_DIR/head.env"
        args+=(--address="$RAY_HEAD_IP:$RAY_GCS_PORT")
    fi
    # Below Ray, bash must not re-read a login profile that puts another
    # python first (ssh-started nodes), so the venv leads PATH.
    unset SSH_CLIENT SSH_CONNECTION
    # (a bare `ray`, the image's own: no dir to put first, never ".")
    case "$AR_RAY" in */*) PATH="$(dirname "$AR_RAY"):$PATH" ;; esac
    export PATH
    if [ -n "$runtime" ]; then
        ar_container_launch "$runtime" "$name" "$tmp"
        launch=("${AR_CONTAINER_LAUNCH[@]}" "${launch[@]}")
    fi
    # A process group of its own (job control: set -m), so this node's processes are exactly
    # that group; but not a session of its own (setsid): a batch system ends a job by its
    # sessions (OpenPBS's MoM kills each task's session), and Ray must end with the job even
    # when this supervisor is SIGKILLed.
    set -m
    [ "$attempt" = 1 ] || printf '\n--- start %s ---\n' "$attempt" >>"$AR_CLUSTER_DIR/logs/ray-$name.log"
    "${launch[@]}" "${args[@]}" >>"$AR_CLUSTER_DIR/logs/ray-$name.log" 2>&1 </dev/null &
    local pgid=$!
    set +m
    # host and group: only this host ever signals this group
    printf '%s %s\n' "$host" "$pgid" >"$AR_CLUSTER_DIR/nodes/$name.pgid"
    # shellcheck disable=SC2064
    # USR1: a worker job's walltime warning (--signal=B:USR1@60)
    trap "ar_stop_node '$name' '$pgid' '$tmp' signal; exit 143" TERM INT HUP USR1
    # Ray's ports are known to every user of the host from here on (ps); nothing connects to
    # one before ar_verify_ports found it this node's own. Not checked: ports Ray opens only
    # with metrics on, and the workers' range (bound by each Ray worker when it starts): a
    # stranger listening there before this check fails it all the same (--watch).
    local watch=(--watch metrics="${ports[5]}" workers="${ports[9]}-${ports[10]}")
    local own=(node_manager="${ports[3]}" object_manager="${ports[4]}" agent_grpc="${ports[7]}"
        agent_http="${ports[6]}" runtime_env_agent="${ports[8]}")
    if [ "$role" = head ]; then
        watch+=(dashboard_metrics="${ports[11]}" autoscaler_metrics="${ports[12]}")
        # Two steps, so the workers start as soon as they can: they talk to the GCS only
        # until the flow found the cluster ready, and the flow waits for the second step
        # (all ports: the dashboard and the job agent get the token from the flow, the Ray
        # Client port from users).
        # (the others watched already: a stranger on one fails it now, not after the workers started)
        if ! ar_verify_ports "$name" "$pgid" "$tmp" gcs="${ports[0]}" "${watch[@]}" dashboard="${ports[1]}" \
            ray_client="${ports[2]}" "${own[@]}"; then
            trap - TERM INT HUP USR1
            ar_stop_node "$name" "$pgid" "$tmp" "a port of this node is not its own"
            return 1
        fi
        ar_write_head_env "$host" "$ip" "${ports[0]}" "${ports[1]}" "${ports[2]}" gcs
        if ! ar_verify_ports "$name" "$pgid" "$tmp" gcs="${ports[0]}" dashboard="${ports[1]}" \
            ray_client="${ports[2]}" "${own[@]}" "${watch[@]}"; then
            trap - TERM INT HUP USR1
            ar_stop_node "$name" "$pgid" "$tmp" "a port of this node is not its own"
            return 1
        fi
    else
        local verified=0
        AR_RAY_MAY_START_AGAIN=1 ar_verify_ports "$name" "$pgid" "$tmp" "${own[@]}" "${watch[@]}" || verified=$?
        if [ "$verified" != 0 ]; then
            trap - TERM INT HUP USR1
            if [ "$verified" = "$AR_ENDED_WHILE_STARTING" ]; then
                ar_stop_node "$name" "$pgid" "$tmp" "Ray ended while starting"
                return "$AR_ENDED_WHILE_STARTING"
            fi
            ar_stop_node "$name" "$pgid" "$tmp" "a port of this node is not its own"
            return 1
        fi
    fi
    # every node says so: the flow counts these before it calls the cluster ready (Ray's
    # head talks to each node's ports, with the token, once the user's job runs)
    printf '%s\n' "$host" >"$AR_CLUSTER_DIR/nodes/$name.ports"
    if [ "$role" = head ]; then
        ar_write_head_env "$host" "$ip" "${ports[0]}" "${ports[1]}" "${ports[2]}" all
        cat "$AR_CLUSTER_DIR/head.env"
    fi
    local status=0 reason="" next_look=0 every
    every="$(ar_glance_every "$name")"
    ar_look_now=0
    trap 'ar_look_now=1' WINCH
    # the process, not its group: the group exists only once setsid has run
    while kill -0 "$pgid" 2>/dev/null; do
        # Ray's own end is seen at once (no filesystem involved); the shared dir at a glance
        # every AR_LOOK_EVERY seconds, all of it at once when signalled
        if [ "$ar_look_now" = 1 ]; then
            ar_look_now=0
            reason="$(ar_stop_reason)"
            [ -z "$reason" ] || break
        elif [ "$SECONDS" -ge "$next_look" ]; then
            next_look=$((SECONDS + every))
            reason="$(ar_stop_glance)"
            [ -z "$reason" ] || break
        fi
        # sleep in the background: a signal's trap runs at once, not after the sleep
        sleep 0.5 &
        wait $! || true
    done
    if [ -z "$reason" ]; then
        wait "$pgid" || status=$?
        reason="Ray ended (exit $status)"
        # before the flow found the cluster ready (its `ready` file): a start that failed
        if [ "$role" = worker ] && [ ! -e "$AR_CLUSTER_DIR/ready" ]; then
            trap - TERM INT HUP USR1 WINCH
            ar_stop_node "$name" "$pgid" "$tmp" "Ray ended while starting (exit $status)"
            return "$AR_ENDED_WHILE_STARTING"
        fi
        # said in the status too: a flow still waiting for this worker fails now, naming it,
        # not at the readiness timeout (a ready cluster's watcher sees the node go)
        [ "$role" = head ] || printf 'RAY_FAILED=worker %s on %s: Ray ended by itself (exit %s), see %s\n' \
            "$name" "$host" "$status" "$AR_CLUSTER_DIR/logs/ray-$name.log" >>"$AR_CLUSTER_DIR/status"
    fi
    trap - TERM INT HUP USR1 WINCH
    ar_stop_node "$name" "$pgid" "$tmp" "$reason"
    return "$status"
}

# Where the head is, for the workers and the flow: head.env, written whole (a reader never
# sees half of it). RAY_PORTS_VERIFIED says which of its ports were found the head's own
# (ar_verify_ports): "gcs" (workers may join), then "all" (the flow may talk to it).
# usage: ar_write_head_env HOST IP GCS_PORT DASHBOARD_PORT CLIENT_PORT gcs|all
ar_write_head_env() {
    {
        printf 'RAY_HEAD_NODE=%s\n' "$1"
        printf 'RAY_HEAD_IP=%s\n' "$2"
        printf 'RAY_GCS_PORT=%s\n' "$3"
        printf 'RAY_DASHBOARD_PORT=%s\n' "$4"
        printf 'RAY_CLIENT_PORT=%s\n' "$5"
        printf 'RAY_PORTS_VERIFIED=%s\n' "$6"
        # the allocation's end (unix seconds; empty: none or unknown), cluster_main.sh
        printf 'RAY_DEADLINE=%s\n' "${AR_DEADLINE:-}"
    } >"$AR_CLUSTER_DIR/head.env.tmp"
    mv "$AR_CLUSTER_DIR/head.env.tmp" "$AR_CLUSTER_DIR/head.env"
}

# Copy one node's logs to the shared filesystem before its temp dir goes:
# <work_dir>/logs/<cluster id>/<node>/, each file gzip'd, newest first until
# AR_LOG_CAP_MB (uncompressed) is reached; ray start's own output too. Never fails
# the stop: a full disk costs the logs, not the teardown.
# usage: ar_collect_node_logs NAME TMP
ar_collect_node_logs() {
    local name="$1" tmp="$2" dest file size total=0 cap
    [ "${AR_KEEP_LOGS:-1}" = 1 ] && [ -n "${AR_LOGS_DIR:-}" ] || return 0
    dest="$AR_LOGS_DIR/$name"
    mkdir -p "$dest" 2>/dev/null || return 0
    chmod 700 "$AR_LOGS_DIR" "$dest" 2>/dev/null || true
    printf '%s\n' "$(ar_host)" >"$dest/HOST" 2>/dev/null || true
    cap=$((${AR_LOG_CAP_MB:-50} * 1024 * 1024))
    # "size path" lines, newest first (one find, no fork per file: a head has dozens of logs)
    while IFS=' ' read -r size file; do
        total=$((total + size))
        if [ "$total" -gt "$cap" ]; then
            echo "capped at ${AR_LOG_CAP_MB:-50} MB: older files left out" >"$dest/CAPPED" 2>/dev/null || true
            break
        fi
        gzip -c "$file" >"$dest/${file##*/}.gz" 2>/dev/null || true
    done < <({
        [ ! -f "$AR_CLUSTER_DIR/logs/ray-$name.log" ] || find "$AR_CLUSTER_DIR/logs/ray-$name.log" -printf '9999999999 %s %p\n'
        find "$tmp"/r/session_*/logs -maxdepth 1 -type f -printf '%T@ %s %p\n' 2>/dev/null | sort -rn
    } | cut -d' ' -f2-)
}

# Stop one node of this host and remove its temp dir; record that it stopped.
ar_stop_node() {
    local name="$1" pgid="$2" tmp="$3" reason="$4"
    # a stop once begun is finished: a scheduler's TERM to every task of the job (its end)
    # arriving now must not cut the temp dir's removal short (its KILL still can, later)
    trap '' TERM INT HUP USR1
    ar_stop_group "$pgid"
    # again: a process the group forked while it was being killed (a raylet starting its
    # agent as it ended) is in the same group and would outlive the node
    sleep 0.2
    ar_stop_group "$pgid"
    [ -z "${AR_CONTAINER_IMAGE:-}" ] || ar_container_stop "$name" "$tmp"
    ar_collect_node_logs "$name" "$tmp"
    rm -rf "$tmp"
    rm -f "$AR_CLUSTER_DIR/nodes/$name.pgid" "$AR_CLUSTER_DIR/nodes/$name.tmp" "$AR_CLUSTER_DIR/nodes/$name.ports" 2>/dev/null || true
    printf '%s %s\n' "$(ar_host)" "$reason" >"$AR_CLUSTER_DIR/nodes/$name.stopped" 2>/dev/null || true
}

# Whether PGID is a process group of this cluster's, which this user may signal: an
# integer > 1 (`kill -- -1` would reach every process of the user, 0 this shell's own
# group), every process in it this user's, and one of them this cluster's: its
# environment holds AR_CLUSTER_ID=<this id> (every script exports the cluster's env
# file), or its command line names the cluster dir or one of its node temp dirs (what a
# container's cleaned environment leaves). A state file is only data: a recorded group
# that is gone, reused by a stranger or by another program of the user's fails here.
# usage: ar_group_is_ours PGID
ar_group_is_ours() {
    local pgid="$1" uid pid members mine
    case "$pgid" in '' | 0* | *[!0-9]*) return 1 ;; esac  # also no sign, no leading zero (octal)
    [ "${#pgid}" -le 9 ] && [ "$pgid" -gt 1 ] || return 1
    [ -n "${AR_CLUSTER_ID:-}" ] && [ -n "${AR_CLUSTER_DIR:-}" ] || return 1
    uid="$(id -u)"
    members="$(pgrep -g "$pgid" 2>/dev/null)" || return 1
    # real and effective uid both this user's (a setuid program in the group is not)
    mine="$(pgrep -g "$pgid" -u "$uid" -U "$uid" 2>/dev/null)" || return 1
    [ "$members" = "$mine" ] || return 1
    for pid in $members; do
        if tr '\0' '\n' 2>/dev/null <"/proc/$pid/environ" | grep -qxF -- "AR_CLUSTER_ID=$AR_CLUSTER_ID"; then
            return 0
        fi
        case "$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline")" in
            *"$AR_CLUSTER_DIR/"* | *"${AR_NODE_TMP:-/nonexistent}/${AR_NODE_TMP_NAME:-/}."*) return 0 ;;
        esac
    done
    return 1
}

# This user's processes on this host that Ray started in sessions of their own, outside
# every recorded group: a Ray job's driver (the job agent starts it with a new session),
# still running when the cluster stops. They lead their own process group and carry the
# cluster's environment (AR_CLUSTER_ID=<id>, from the node's `ray start`). The launchers
# (srun, pbs_tmrsh, ssh) carry it too but lead no group: they end with their workers.
# usage: ar_stop_cluster_env_processes [SPARED_GROUP...] (groups left to their own node's stop)
ar_stop_cluster_env_processes() {
    local pid pids=() me spared=" $* "
    [ -n "${AR_CLUSTER_ID:-}" ] || return 0
    me="$(id -u)"
    for pid in $(pgrep -u "$me" -U "$me" 2>/dev/null); do
        case "$pid" in "$$" | "${BASHPID:-$$}" | "$PPID") continue ;; esac
        case "$spared" in *" $pid "*) continue ;; esac
        [ "$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ')" = "$pid" ] || continue
        if tr '\0' '\n' 2>/dev/null <"/proc/$pid/environ" | grep -qxF -- "AR_CLUSTER_ID=$AR_CLUSTER_ID"; then
            pids+=("$pid")
        fi
    done
    # the user's job runs from the cluster's job dir (its working_dir): a driver found by its path
    mapfile -t -O "${#pids[@]}" pids < <(pgrep -u "$me" -f -- "$AR_CLUSTER_DIR/job/" 2>/dev/null | grep -vx -e "$$" -e "${BASHPID:-$$}" -e "$PPID")
    [ "${#pids[@]}" -gt 0 ] || return 0
    kill -KILL "${pids[@]}" 2>/dev/null || true
}

# Stop one process group of this cluster's: TERM, a short grace, then KILL. A group
# that is not the cluster's (ar_group_is_ours) is never signalled, and said so.
ar_stop_group() {
    local pgid="$1" _
    if ! ar_group_is_ours "$pgid"; then
        # nothing of ours there: gone already (the usual case), or a record not to trust
        pgrep -g "$pgid" >/dev/null 2>&1 && ar_log "process group '$pgid' is not this cluster's: not signalled"
        return 0
    fi
    kill -TERM -- "-$pgid" 2>/dev/null || return 0
    # Ray's GCS and raylet do not end on TERM at all (measured: still there after 15 s),
    # so a long grace only delays every stop: the others get 0.3 s, then KILL
    for _ in 1 2 3; do
        kill -0 -- "-$pgid" 2>/dev/null || return 0
        sleep 0.1
    done
    # checked again: in the grace the group may have ended and its number been reused
    ! ar_group_is_ours "$pgid" || kill -KILL -- "-$pgid" 2>/dev/null || true
}

# Stop every process of this cluster on THIS host: the process groups recorded
# by this host, then this user's processes whose command line names one of the
# cluster's temp dirs recorded by this host, then those temp dirs. Whatever
# other hosts recorded is never acted on here (a PID or a /tmp path means
# nothing outside its own host).
# Never `ray stop`: that would stop other clusters of the same user.
# usage: ar_stop_cluster_here [allocation] (allocation: not the worker jobs' nodes, which
# stop themselves and end with their own jobs; a job's end must not race them on their host)
ar_stop_cluster_here() {
    local file host pgid pids here tmp skip=/ spared=()
    [ "${1:-}" != allocation ] || skip=wjob-
    here="$(ar_host)"
    for file in "$AR_CLUSTER_DIR"/nodes/*.pgid; do
        [ -e "$file" ] || continue
        pgid=""
        read -r host pgid <"$file" || [ -n "$pgid" ] || continue
        [ "$host" = "$here" ] || continue
        case "${file##*/}" in "$skip"*) spared+=("$pgid"); continue ;; esac
        # a record that is no number is left alone (and reported as not stopped)
        case "$pgid" in '' | *[!0-9]*) continue ;; esac
        {
            ar_stop_group "$pgid"
            rm -f "$file"
            printf '%s %s\n' "$here" "stopped by its host's sweep" >"${file%.pgid}.stopped"
        } &
    done
    wait
    ar_stop_cluster_env_processes "${spared[@]}"
    [ -z "${AR_CONTAINER_IMAGE:-}" ] || ar_container_stop_here
    for file in "$AR_CLUSTER_DIR"/nodes/*.tmp; do
        [ -e "$file" ] || continue
        case "${file##*/}" in "$skip"*) continue ;; esac
        tmp=""
        read -r host tmp <"$file" || [ -n "$tmp" ] || continue
        [ "$host" = "$here" ] || continue
        # only a dir of ours, directly under the node temp root, named as we name them
        case "$tmp" in "$AR_NODE_TMP/$AR_NODE_TMP_NAME."*) ;; *) continue ;; esac
        case "${tmp#"$AR_NODE_TMP/"}" in */*) continue ;; esac
        pids="$(pgrep -u "$(id -u)" -f -- "$tmp/" || true)"
        if [ -n "$pids" ]; then
            # shellcheck disable=SC2086
            kill -KILL $pids 2>/dev/null || true
        fi
        if [ -d "$tmp" ] && [ -O "$tmp" ] && [ ! -L "$tmp" ]; then
            ar_collect_node_logs "$(basename "$file" .tmp)" "$tmp"
            rm -rf "$tmp"
        fi
        rm -f "$file"
    done
}

# Nodes that recorded a process group but not that they stopped: "name@host" lines.
ar_nodes_not_stopped() {
    local file host pgid
    for file in "$AR_CLUSTER_DIR"/nodes/*.pgid; do
        [ -e "$file" ] || continue
        pgid=""
        read -r host pgid <"$file" || [ -n "$pgid" ] || continue
        printf '%s@%s\n' "$(basename "$file" .pgid)" "$host"
    done
}

# The first line every worker writes to its launcher's output: a launcher whose output lacks
# it failed before the worker began.
AR_WORKER_BEGAN="activate-ray: worker began on"
ar_worker_began() { printf '%s %s\n' "$AR_WORKER_BEGAN" "$(hostname -s)" >&2; }

# A worker launch that ended (non-zero) before its node recorded anything never started Ray
# there: said in the cluster's status with the launcher's or the worker's own last words, so
# the flow fails now instead of waiting for a node that cannot come. A launcher that failed
# before the worker began (pbsdsh, srun, pbs_tmrsh or ssh refusing) is said as such: a fresh
# cluster would fail the same way. (After the node started, its own supervisor reports how it ended.)
# usage: ar_launcher_ended WHAT NODE STATUS (its output in logs/workers-NODE.log)
ar_launcher_ended() {
    local what="$1" node="$2" status="$3" log said
    [ "$status" != 0 ] || return 0
    [ ! -e "$AR_CLUSTER_DIR/nodes/$node.pgid" ] && [ ! -e "$AR_CLUSTER_DIR/nodes/$node.stopped" ] || return 0
    [ ! -e "$AR_CLUSTER_DIR/stop" ] || return 0
    log="$AR_CLUSTER_DIR/logs/workers-$node.log"
    said="$(grep -v -F "$AR_WORKER_BEGAN" "$log" 2>/dev/null | tail -n 3 | tr '\n' ' ')"
    if grep -q -F "$AR_WORKER_BEGAN" "$log" 2>/dev/null; then
        printf 'RAY_FAILED=worker on %s exited %s before Ray started: %s\n' "$node" "$status" "${said:-(no output)}"
    else
        printf 'RAY_FAILED=launcher: %s exited %s before the worker on %s began: %s\n' \
            "$what" "$status" "$node" "${said:-(no output)}"
    fi >>"$AR_CLUSTER_DIR/status"
}


# The cluster's main loop, on the head: runs until asked to stop, until the
# flow goes silent (dead-man switch) or until the head's Ray ends. Returns 0
# only for a stop the flow asked for; the job's exit status says the rest.
ar_supervise() {
    local head_pid="$1" reason="" next_look=0 now
    ar_look_now=0
    trap 'ar_look_now=1' WINCH  # the flow's teardown: look at the stop file now
    while :; do
        if [ "$ar_look_now" = 1 ]; then
            ar_look_now=0
            reason="$(ar_stop_reason)"
            [ -z "$reason" ] || break
        elif [ "$SECONDS" -ge "$next_look" ]; then
            next_look=$((SECONDS + AR_LOOK_EVERY))
            reason="$(ar_stop_glance)"
            [ -z "$reason" ] || break
        fi
        if ! kill -0 "$head_pid" 2>/dev/null; then
            # the head node itself may have seen the stop first (each glances on its own)
            reason="$(ar_stop_reason)"
            [ -n "$reason" ] || reason="head node's Ray ended"
            break
        fi
        # the allocation's end (AR_DEADLINE, cluster_main.sh): the flow stops the job and the
        # cluster walltime_margin before it; this stops the cluster if the flow did not
        printf -v now '%(%s)T' -1
        if [ -n "${AR_DEADLINE:-}" ] && [ "$now" -ge $((AR_DEADLINE - ${AR_END_MARGIN:-10})) ]; then
            reason="walltime reached: the allocation ends at $AR_DEADLINE"; break
        fi
        sleep 0.5 &
        wait $! || true
    done
    ar_log "stopping cluster $AR_CLUSTER_ID: $reason"
    printf 'STOP_REASON=%s\n' "$reason" >>"$AR_CLUSTER_DIR/status" 2>/dev/null || true
    case "$reason" in
        "stop requested") return 0 ;;
        *dead-man*)
            # nobody is left to remove the cluster's files: the cleanup does it
            export AR_REMOVE_CLUSTER_DIR=1  # read by ar_cleanup (cluster_main.sh)
            return 1 ;;
        *) return 1 ;;
    esac
}

# The job's own output (the job script's, the supervisor's, the workers' launch) to
# <work_dir>/logs/<cluster id>/job/, gzip'd, before the cluster dir is removed.
ar_collect_job_logs() {
    local dest file found=""
    [ "${AR_KEEP_LOGS:-1}" = 1 ] && [ -n "${AR_LOGS_DIR:-}" ] || return 0
    for file in "$AR_CLUSTER_DIR"/logs/*; do
        if [ -f "$file" ]; then found=1; break; fi
    done
    # a job that never ran (a queued successor allocation, cancelled) has no output: no logs dir
    [ -n "$found" ] || [ -d "$AR_LOGS_DIR" ] || return 0
    dest="$AR_LOGS_DIR/job"
    mkdir -p "$dest" 2>/dev/null || return 0
    chmod 700 "$AR_LOGS_DIR" "$dest" 2>/dev/null || true
    for file in "$AR_CLUSTER_DIR"/logs/*; do
        [ -f "$file" ] || continue
        case "$(basename "$file")" in ray-*.log) continue ;; esac  # with its node's logs
        gzip -c "$file" >"$dest/$(basename "$file").gz" 2>/dev/null || true
    done
}

# --- container option (issue 16) ----------------------------------------------
# With AR_CONTAINER_IMAGE set (cluster.env), every Ray node runs inside that
# image: `ray start` and all it starts are the image's processes (its own
# python3 and ray), on the host's network, with the work dir, the cluster dir
# and the node's temp dir bound in at the same paths. AR_CONTAINER_RUNTIMES:
# the runtimes that can run the image, in the order a node looks for them.
# apptainer/singularity `exec` processes are ordinary children of the node's
# session; podman's are not (conmon runs them), so the node also stops its
# container by name and kills what still names its temp dir.

# Env vars Ray needs inside the container. Passed by name only, never with
# their values on a command line (where ps and logs would show them).
AR_CONTAINER_ENV=(AR_CLUSTER_ID RAY_AUTH_MODE RAY_AUTH_TOKEN_PATH RAY_enable_metrics_collection
    DASHBOARD_METRIC_PORT AUTOSCALER_METRIC_PORT
    CUDA_VISIBLE_DEVICES ROCR_VISIBLE_DEVICES HIP_VISIBLE_DEVICES)

# The runtime this node runs the image with: the first of AR_CONTAINER_RUNTIMES
# found here. None found: said in the cluster's status (the flow fails at once,
# naming this node) and here, before the node made anything.
ar_container_runtime() {
    local runtime runtimes dir
    for dir in "$AR_WORK_DIR" "$AR_CLUSTER_DIR" "$AR_NODE_TMP"; do
        # ':' and ',' separate bind specs (podman -v, apptainer --bind)
        case "$dir" in "" | /*[,:]* | [!/]*)
            ar_log "cannot bind $dir into the container: not an absolute path without ':' and ','"
            return 1 ;;
        esac
    done
    read -r -a runtimes <<<"$AR_CONTAINER_RUNTIMES"
    for runtime in "${runtimes[@]}"; do
        if command -v "$runtime" >/dev/null 2>&1; then
            printf '%s\n' "$runtime"
            return 0
        fi
    done
    local why
    why="no container runtime on node $(hostname): none of ${runtimes[*]} is on PATH (image $AR_CONTAINER_IMAGE)"
    ar_log "$why"
    printf 'RAY_FAILED=%s\n' "$why" >>"$AR_CLUSTER_DIR/status"
    return 1
}

# The podman container of one node: unique per cluster and node on a host.
ar_container_name() { printf '%s-%s\n' "$AR_CLUSTER_ID" "$1"; }

# The command prefix that runs one node's Ray inside the image, in the array
# AR_CONTAINER_LAUNCH (followed by the command to run in it); exports what
# apptainer/singularity pass in from APPTAINERENV_*/SINGULARITYENV_*. podman:
# records the container's name for the stop (nodes/NAME.container).
# usage: ar_container_launch RUNTIME NAME NODE_TMP
ar_container_launch() {
    local runtime="$1" name="$2" tmp="$3" image="$AR_CONTAINER_IMAGE" dir var env_prefix
    local binds=("$AR_WORK_DIR" "$AR_CLUSTER_DIR" "$tmp")
    # ~ in an image path: this node user's home (the env file keeps it unexpanded)
    case "$image" in
        \~/*) image="$HOME/${image#\~/}" ;;
        *:\~/*) image="${image%%:*}:$HOME/${image#*:\~/}" ;;  # oci-archive:~/x.tar
    esac
    case "$runtime" in
        apptainer | singularity)
            # the host's environment (a venv's PATH, PYTHONPATH) stays out; what Ray needs goes in
            env_prefix="$(printf '%s' "$runtime" | tr '[:lower:]' '[:upper:]')ENV_"
            AR_CONTAINER_LAUNCH=("$runtime" exec --cleanenv)
            for var in "${AR_CONTAINER_ENV[@]}"; do
                [ -n "${!var+set}" ] || continue
                export "$env_prefix$var=${!var}"
            done
            # GPUs asked for: the host's NVIDIA driver libraries and devices go in
            if [ "${AR_NUM_GPUS:-0}" -gt 0 ] 2>/dev/null; then AR_CONTAINER_LAUNCH+=(--nv); fi
            for dir in "${binds[@]}"; do AR_CONTAINER_LAUNCH+=(--bind "$dir"); done
            ;;
        podman)
            # --rm: nothing left once it ends. A PID namespace of its own with an init (--init) as
            # its PID 1: when the container stops, the kernel ends every process in it, Ray's
            # daemons included (no cgroup needed: rootless podman has none on cgroup v1, and
            # crun refuses --cgroups=disabled with the host's PIDs). The host's network and
            # /dev/shm (Ray's object store; podman's own is 64 MB) as without a container;
            # keep-id: inside, the user is the same uid, so the bound dirs stay theirs.
            AR_CONTAINER_LAUNCH=(podman run --rm --init --name "$(ar_container_name "$name")"
                --network=host --userns=keep-id --volume /dev/shm:/dev/shm)
            for var in "${AR_CONTAINER_ENV[@]}"; do
                [ -n "${!var+set}" ] || continue
                export "${var?}"
                AR_CONTAINER_LAUNCH+=(--env "$var")  # the name alone: podman takes the value from its env
            done
            for dir in "${binds[@]}"; do AR_CONTAINER_LAUNCH+=(--volume "$dir:$dir"); done
            printf '%s %s\n' "$(ar_host)" "$(ar_container_name "$name")" >"$AR_CLUSTER_DIR/nodes/$name.container"
            ;;
        *) ar_log "unknown container runtime $runtime"; return 1 ;;
    esac
    AR_CONTAINER_LAUNCH+=("$image")
}

# After the node's process group was stopped: its podman container (by name),
# then any process that still names the node's temp dir, unique to this node.
# usage: ar_container_stop NAME NODE_TMP
ar_container_stop() {
    local name="$1" tmp="$2" pids
    ar_container_remove "$AR_CLUSTER_DIR/nodes/$name.container"
    pids="$(pgrep -u "$(id -u)" -f -- "$tmp/" || true)"
    if [ -n "$pids" ]; then
        # shellcheck disable=SC2086 # one word per pid
        kill -KILL $pids 2>/dev/null || true
    fi
}

# Remove the podman container a nodes/NAME.container file names, if this host recorded it.
ar_container_remove() {
    local file="$1" host="" cname=""
    [ -e "$file" ] || return 0
    read -r host cname <"$file" || [ -n "$cname" ] || return 0
    [ "$host" = "$(ar_host)" ] || return 0
    case "$cname" in "$AR_CLUSTER_ID"-*) ;; *) return 0 ;; esac  # only a name of this cluster's
    if command -v podman >/dev/null 2>&1; then
        podman rm --force --ignore --time 2 "$cname" >/dev/null 2>&1 || true
    fi
    rm -f "$file"
}

# This host's sweep: every podman container of this cluster it recorded.
ar_container_stop_here() {
    local file
    for file in "$AR_CLUSTER_DIR"/nodes/*.container; do
        [ -e "$file" ] || continue
        ar_container_remove "$file"
    done
}
# --- end of the container option
