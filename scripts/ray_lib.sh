# Functions shared by the scripts that run on the cluster. Sourced, not run.
# Every script first sources the cluster's env file, which the flow writes
# with each value shell-quoted: AR_CLUSTER_ID, AR_CLUSTER_DIR, AR_NODE_TMP,
# AR_PYTHON, AR_RAY, AR_NUM_CPUS, AR_NUM_GPUS, AR_MEMORY, AR_OBJECT_STORE,
# AR_DASHBOARD_HOST, AR_DASHBOARD_PORT, AR_HEARTBEAT_TIMEOUT, RAY_AUTH_MODE...

ar_log() { printf '%s [%s] %s\n' "$(date +%H:%M:%S)" "$(hostname -s)" "$*" >&2; }

# A node's own address, looked up from its name, never guessed; loopback is
# refused because other nodes could not reach it.
ar_node_ip() {
    local name ip
    name="$(hostname)"
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

# Free ports for one Ray node, held open together while chosen so they are
# distinct: gcs dashboard client node_manager object_manager metrics
# agent_http agent_grpc runtime_env worker_min worker_max.
ar_free_ports() {
    "$AR_PYTHON" - "$AR_DASHBOARD_PORT" <<'PY'
import random, socket, sys

held = []
def grab(port=0):
    s = socket.socket()
    try:
        s.bind(("", port))
    except OSError:
        s.close()
        return None
    held.append(s)
    return s.getsockname()[1]

dashboard = grab(int(sys.argv[1])) or grab()
ports = [grab(), dashboard] + [grab() for _ in range(7)]
# Workers need a contiguous range: try random bases below the ephemeral range.
for _ in range(200):
    base = random.randrange(12000, 30000, 50)
    mark = len(held)
    if all(grab(p) for p in range(base, base + 50)):  # stops at the first busy port
        ports += [base, base + 49]
        break
    for s in held[mark:]:
        s.close()
    del held[mark:]
else:
    sys.exit("no free worker port range")
print(*ports)
PY
}

ar_node_tmp() { printf '%s/%s-%s\n' "$AR_NODE_TMP" "$AR_CLUSTER_ID" "$1"; }

# Start one Ray node in a session of its own (its process group is then
# exactly this node's processes) and block until it ends.
# usage: ar_run_node head|worker NAME
ar_run_node() {
    local role="$1" name="$2" tmp ip args ports
    tmp="$(ar_node_tmp "$name")"
    ip="$(ar_node_ip)"
    mkdir -p "$tmp"
    read -r -a ports < <(ar_free_ports)
    args=(start --block --temp-dir="$tmp" --node-ip-address="$ip"
        --num-cpus="$AR_NUM_CPUS" --num-gpus="$AR_NUM_GPUS"
        --memory="$AR_MEMORY" --object-store-memory="$AR_OBJECT_STORE"
        --node-manager-port="${ports[3]}" --object-manager-port="${ports[4]}"
        --metrics-export-port="${ports[5]}" --dashboard-agent-listen-port="${ports[6]}"
        --dashboard-agent-grpc-port="${ports[7]}" --runtime-env-agent-port="${ports[8]}"
        --min-worker-port="${ports[9]}" --max-worker-port="${ports[10]}"
        --disable-usage-stats)
    if [ "$role" = head ]; then
        args+=(--head --port="${ports[0]}" --dashboard-host="$AR_DASHBOARD_HOST"
            --dashboard-port="${ports[1]}" --ray-client-server-port="${ports[2]}")
    else
        # shellcheck disable=SC1091
        . "$AR_CLUSTER_DIR/head.env"
        args+=(--address="$RAY_HEAD_IP:$RAY_GCS_PORT")
    fi
    # Below Ray, bash must not re-read a login profile that puts another
    # python first (ssh-started nodes), so the venv leads PATH.
    unset SSH_CLIENT SSH_CONNECTION
    export PATH="$(dirname "$AR_RAY"):$PATH"
    setsid "$AR_RAY" "${args[@]}" >"$AR_CLUSTER_DIR/logs/ray-$name.log" 2>&1 </dev/null &
    local pgid=$!
    printf '%s\n' "$pgid" >"$AR_CLUSTER_DIR/nodes/$name.pgid"
    if [ "$role" = head ]; then
        {
            printf 'RAY_HEAD_NODE=%s\n' "$(hostname -s)"
            printf 'RAY_HEAD_IP=%s\n' "$ip"
            printf 'RAY_GCS_PORT=%s\n' "${ports[0]}"
            printf 'RAY_DASHBOARD_PORT=%s\n' "${ports[1]}"
            printf 'RAY_CLIENT_PORT=%s\n' "${ports[2]}"
        } >"$AR_CLUSTER_DIR/head.env.tmp"
        mv "$AR_CLUSTER_DIR/head.env.tmp" "$AR_CLUSTER_DIR/head.env"
        cat "$AR_CLUSTER_DIR/head.env"
    fi
    # shellcheck disable=SC2064
    trap "ar_stop_group $pgid; rm -rf '$tmp'; exit 143" TERM INT HUP
    local status=0
    wait "$pgid" || status=$?
    trap - TERM INT HUP
    ar_stop_group "$pgid"
    rm -rf "$tmp"
    return "$status"
}

# Stop one process group: TERM, a short grace, then KILL.
ar_stop_group() {
    local pgid="$1" _
    kill -TERM -- "-$pgid" 2>/dev/null || return 0
    # Ray's daemons take 10 s and more to honour TERM: give them 1 s, then KILL
    for _ in 1 2 3 4 5; do
        kill -0 -- "-$pgid" 2>/dev/null || return 0
        sleep 0.2
    done
    kill -KILL -- "-$pgid" 2>/dev/null || true
}

# Stop every process of this cluster on this host: the recorded process
# groups, then anything whose command line names one of its temp dirs.
# Never `ray stop`: that would stop other clusters of the same user.
ar_stop_cluster_here() {
    local file pids
    for file in "$AR_CLUSTER_DIR"/nodes/*.pgid; do
        [ -e "$file" ] && ar_stop_group "$(cat "$file")" &
    done
    wait
    pids="$(pgrep -f -- "$AR_NODE_TMP/$AR_CLUSTER_ID-" || true)"
    if [ -n "$pids" ]; then
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null || true
    fi
    rm -rf "$AR_NODE_TMP/$AR_CLUSTER_ID"-*
}

# Seconds since the controlling flow last touched the heartbeat file.
ar_heartbeat_age() {
    local beat
    beat="$(stat -c %Y "$AR_CLUSTER_DIR/heartbeat" 2>/dev/null || echo 0)"
    echo $(( $(date +%s) - beat ))
}

# The cluster's main loop, on the head: runs until asked to stop, until the
# flow goes silent (dead-man switch) or until the head's Ray ends.
ar_supervise() {
    local head_pid="$1" reason=""
    while :; do
        if [ -e "$AR_CLUSTER_DIR/stop" ]; then reason="stop requested"; break; fi
        if [ ! -d "$AR_CLUSTER_DIR" ]; then reason="cluster dir removed"; break; fi
        if [ "$(ar_heartbeat_age)" -gt "$AR_HEARTBEAT_TIMEOUT" ]; then
            reason="no heartbeat from the flow for more than ${AR_HEARTBEAT_TIMEOUT}s (dead-man switch)"
            # nobody is left to remove the cluster's files: the cleanup does it
            AR_REMOVE_CLUSTER_DIR=1
            break
        fi
        if ! kill -0 "$head_pid" 2>/dev/null; then reason="head node's Ray ended"; break; fi
        sleep 1
    done
    ar_log "stopping cluster $AR_CLUSTER_ID: $reason"
    printf 'STOP_REASON=%s\n' "$reason" >>"$AR_CLUSTER_DIR/status" 2>/dev/null || true
}
