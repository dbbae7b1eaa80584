#!/usr/bin/env bash
# What breaks a Ray node on this host, found before `ray start`: run by every node of every
# cluster (ar_run_node), and by `python -m flows.ray_cluster check --on-nodes` in a short job.
# One row per check on stdout, tab-separated:
#   AR_CHECK <check> <pass|warn|fail> <what was found> <the fix in one line>
# Exit 1 when a row fails. The words are the same in a run and in `check`; the login host's
# own rows (tasks/checks.py) say the socket-path one in the same words too.
# Reads the cluster's env (cluster.env and environment.env, already sourced by the caller):
# AR_NODE_TMP, AR_NODE_TMP_MAX_LEN, AR_PYTHON, AR_RAY, AR_RAY_VERSION, AR_CLIENT_PYTHON,
# AR_OBJECT_STORE, AR_NETWORK_INTERFACE, AR_CLUSTER_DIR, AR_SCHEDULER, AR_CONTAINER_IMAGE.
# usage: node_check.sh
set -uo pipefail
host="$(hostname -s)"
failed=0

row() {
    printf 'AR_CHECK\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4"
    [ "$2" != fail ] || failed=1
}

# Ray's socket paths: <node tmp>/<cluster id prefix>.XXXXXX/r/session_<date>_<pid>/sockets/...
# (tasks/settings.py: NODE_TMP_MAX_LEN); AF_UNIX takes 107 bytes at most.
check_socket_paths() {
    local root="$AR_NODE_TMP" room="${AR_NODE_TMP_MAX_LEN:-15}" longest
    longest=$(( ${#root} + 107 - room ))
    if [ "${#root}" -gt "$room" ]; then
        row "socket paths" fail "Ray's socket paths under node temp root $root (${#root} characters) would be up to $longest bytes, over the 107-byte AF_UNIX limit" \
            "\`--node-tmp /tmp\` (a node-local dir of at most $room characters)"
    else
        row "socket paths" pass "node temp root $root: socket paths up to $longest of 107 bytes" ""
    fi
}

check_temp_dir() {
    local root="$AR_NODE_TMP" fstype real home_real work_real shared=""
    # Shared (network or parallel) filesystems, by name and by magic number: `stat -f` names
    # some only by number (BeeGFS, GPFS on older coreutils).
    local shared_fs_re='^(nfs|nfs4|lustre|gpfs|beegfs|ceph|cephfs|fuse\.ceph.*|glusterfs|fuse\.glusterfs|panfs|wekafs|cifs|smb.*|afs|9p|fuse\.sshfs|fuse\.s3fs|UNKNOWN \(0x(19830326|47504653|bd00bd0|aad7aaea)\))$'
    if [ ! -d "$root" ] || [ ! -w "$root" ]; then
        row "temp dir" fail "node temp root $root is not a directory you can write on $host" \
            "\`--node-tmp /tmp\` (a node-local dir that exists on every node)"
        return
    fi
    fstype="$(stat -f -c %T "$root" 2>/dev/null || echo unknown)"
    real="$(cd "$root" && pwd -P)"
    if [[ "$fstype" =~ $shared_fs_re ]]; then
        shared="a $fstype filesystem"
    elif [ "${AR_SCHEDULER:-none}" != none ]; then
        # Where every filesystem has the same type (one disk, or a shared one that `stat -f` does
        # not name), a path still says it: the home and the work dir are on every node by definition.
        home_real="$(cd ~ 2>/dev/null && pwd -P)" || home_real=""
        work_real="$(cd "${AR_CLUSTER_DIR%/clusters/*}" 2>/dev/null && pwd -P)" || work_real=""
        if [ -n "$home_real" ] && [[ "$real/" == "$home_real/"* ]]; then
            shared="under your home $home_real (shared by every node)"
        elif [ -n "$work_real" ] && [[ "$real/" == "$work_real/"* ]]; then
            shared="under the work dir $work_real (shared by every node)"
        fi
    fi
    if [ -n "$shared" ]; then
        row "temp dir" fail "node temp root $root on $host is $shared, not node-local: Ray's sockets and spilled objects need a local disk" \
            "\`--node-tmp /local/scratch\` (a node-local disk, e.g. /tmp)"
    else
        row "temp dir" pass "node temp root $root on $host: $fstype, node-local" ""
    fi
}

# Free KiB of the filesystem holding $1
free_kib() { df -Pk "$1" 2>/dev/null | awk 'NR == 2 {print $4}'; }

check_space() {
    local store="${AR_OBJECT_STORE:-}" tmp_free shm_free store_kib=0
    [ -z "$store" ] || store_kib=$(( store / 1024 ))
    tmp_free="$(free_kib "$AR_NODE_TMP")"
    if [ -z "$tmp_free" ]; then
        :  # no dir: the temp dir row said it
    elif [ "$tmp_free" -lt 1048576 ]; then
        row "temp dir space" fail "$((tmp_free / 1024)) MB free in $AR_NODE_TMP on $host: Ray needs 1 GB or more for logs and spilled objects" \
            "\`--node-tmp\` a node-local dir with space (or free some in $AR_NODE_TMP)"
    elif [ "$tmp_free" -lt "$store_kib" ]; then
        row "temp dir space" warn "$((tmp_free / 1024)) MB free in $AR_NODE_TMP on $host, less than the object store asked for ($((store_kib / 1024)) MB): spilling can fill it" \
            "\`--node-tmp\` a node-local dir with more space"
    else
        row "temp dir space" pass "$((tmp_free / 1024)) MB free in $AR_NODE_TMP on $host" ""
    fi
    shm_free="$(free_kib /dev/shm)"
    if [ -z "$shm_free" ]; then
        row "/dev/shm" warn "no /dev/shm on $host: Ray's object store falls back to the temp dir (slow)" \
            "ask the site for /dev/shm on the compute nodes"
    elif [ "$shm_free" -lt "$store_kib" ]; then
        row "/dev/shm" fail "$((shm_free / 1024)) MB free in /dev/shm on $host, less than the object store asked for ($((store_kib / 1024)) MB)" \
            "\`--object-store-memory-gb $(awk -v k="$shm_free" 'BEGIN {printf "%.1f", k * 0.8 / 1048576}')\` (at most what /dev/shm has free)"
    else
        row "/dev/shm" pass "$((shm_free / 1024)) MB free in /dev/shm on $host${store:+ (object store: $((store_kib / 1024)) MB)}" ""
    fi
}

check_limits() {
    local nofile nproc head_needs
    nofile="$(ulimit -n)"
    nproc="$(ulimit -u)"
    # the head's GCS holds connections to every node's raylet and workers: a few dozen
    # descriptors per node (1,024 nodes: about 33,000; the usual 1,024 covers 32 nodes)
    head_needs=$((32 * ${AR_EXPECTED_NODES:-1}))
    if [ "${AR_CHECK_NODE:-}" = head ] && [ "$nofile" != unlimited ] && [ "$nofile" -lt "$head_needs" ]; then
        row "open files" fail "ulimit -n is $nofile on the head ($host): a cluster of ${AR_EXPECTED_NODES:-1} nodes needs about $head_needs there" \
            "\`ulimit -n 65536\` in setup_commands (or the site's hard limit, at least $head_needs)"
    elif [ "$nofile" != unlimited ] && [ "$nofile" -lt 1024 ]; then
        row "open files" fail "ulimit -n is $nofile on $host: Ray's raylet and workers run out of file descriptors" \
            "\`ulimit -n 65536\` in setup_commands (or the site's limit; not lower than 1024)"
    elif [ "$nofile" != unlimited ] && [ "$nofile" -lt 65536 ]; then
        row "open files" warn "ulimit -n is $nofile on $host (Ray recommends 65536): many actors or connections can run out" \
            "\`ulimit -n 65536\` in setup_commands, if the hard limit allows"
    else
        row "open files" pass "ulimit -n is $nofile on $host" ""
    fi
    if [ "$nproc" != unlimited ] && [ "$nproc" -lt 512 ]; then
        row "processes" fail "ulimit -u is $nproc on $host: Ray starts a process per worker and cannot start enough" \
            "\`ulimit -u 4096\` in setup_commands (or the site's limit)"
    elif [ "$nproc" != unlimited ] && [ "$nproc" -lt 4096 ]; then
        row "processes" warn "ulimit -u is $nproc on $host: many workers may not start" "\`ulimit -u 4096\` in setup_commands"
    else
        row "processes" pass "ulimit -u is $nproc on $host" ""
    fi
}

check_ray() {
    local found python_version
    if [ -n "${AR_CONTAINER_IMAGE:-}" ]; then
        row "ray" pass "Ray and Python of image $AR_CONTAINER_IMAGE (not checked on the host)" ""
        return
    fi
    if ! found="$("$AR_PYTHON" -c 'import importlib.metadata as m, sys; print(m.version("ray")); print("%d.%d" % sys.version_info[:2])' 2>/dev/null)"; then
        if command -v "$AR_PYTHON" >/dev/null 2>&1; then
            row "ray" fail "no ray in $AR_PYTHON on $host (the client asks for ray $AR_RAY_VERSION)" \
                "\`--python\` an interpreter with ray==$AR_RAY_VERSION on every node (or setup_commands that load it there)"
        else
            row "ray" fail "no python $AR_PYTHON on $host" \
                "\`--python\` an interpreter with ray==$AR_RAY_VERSION on every node (or setup_commands that load it there)"
        fi
        return
    fi
    python_version="${found#*$'\n'}"
    found="${found%%$'\n'*}"
    if [ "$found" != "$AR_RAY_VERSION" ]; then
        row "ray" fail "ray $found in $AR_PYTHON on $host, the client asks for ray $AR_RAY_VERSION" \
            "\`--python\` an interpreter with ray==$AR_RAY_VERSION on every node (or \`--ray-version $found\`)"
    elif [ ! -x "$AR_RAY" ] && ! command -v "$AR_RAY" >/dev/null 2>&1; then
        row "ray" fail "no ray command $AR_RAY beside $AR_PYTHON on $host" \
            "\`--python\` an interpreter whose bin dir has ray (a venv with ray[default]==$AR_RAY_VERSION)"
    else
        row "ray" pass "ray $found in $AR_PYTHON on $host" ""
    fi
    if [ -n "${AR_CLIENT_PYTHON:-}" ] && [ "$python_version" != "$AR_CLIENT_PYTHON" ]; then
        row "python" warn "Python $python_version on $host, $AR_CLIENT_PYTHON on the client: a Ray Client (ray://) driver needs the same" \
            "\`--python\` a Python $AR_CLIENT_PYTHON on the nodes, if you connect with ray://"
    else
        row "python" pass "Python $python_version on $host" ""
    fi
}

check_network() {
    local ip problem
    if [ -z "${AR_NETWORK_INTERFACE:-}" ]; then
        ip="$(getent ahostsv4 "$(hostname)" 2>/dev/null | awk '$1 !~ /^127\./ {print $1; exit}')"
        [ -n "$ip" ] || ip="$(hostname -I 2>/dev/null | tr ' ' '\n' | awk '/^[0-9.]+$/ && $1 !~ /^127\./ {print; exit}')"
        if [ -n "$ip" ]; then
            row "network" pass "$host: address $ip (from its name)" ""
        else
            row "network" fail "$host: no non-loopback IPv4 address for its name" \
                "\`--network-interface\` the interface the nodes share (e.g. ib0, or a subnet 10.20.0.0/16)"
        fi
        return
    fi
    if ip="$("$AR_PYTHON" "$AR_CLUSTER_DIR/bin/node_ip.py" "$AR_NETWORK_INTERFACE" 2>&1)" \
        || ip="$(python3 "$AR_CLUSTER_DIR/bin/node_ip.py" "$AR_NETWORK_INTERFACE" 2>&1)"; then
        row "network" pass "$host: address $ip on $AR_NETWORK_INTERFACE" ""
    else
        problem="$(printf '%s' "$ip" | tail -n 1)"
        row "network" fail "$problem" "\`--network-interface\` one every node has (an interface name or its subnet)"
    fi
}

check_ray
check_socket_paths
check_temp_dir
check_space
check_limits
check_network
exit "$failed"
