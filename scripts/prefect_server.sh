#!/usr/bin/env bash
# A lasting Prefect server of this user's, for runs that skip the temporary server
# (about 15 s of every run) and show in a UI: on loopback only, on a free port
# (never a fixed one: on a shared login node 4200 may be someone else's), with a
# random basic-auth secret, since every user of the machine reaches loopback.
# `start` writes PREFECT_API_URL and the secret into the current Prefect profile
# (0600), so later runs use it; `stop` stops it and removes both again. The secret
# is on no command line (`ps` shows every one to every user): the server and every
# helper here take it from their environment or from a file only the user reads.
# usage: prefect_server.sh start|stop|status
#   env: PREFECT_BIN (the prefect CLI; its python is used too), AR_SERVER_DIR
set -euo pipefail
# every file and dir made here (the secret, the profile holding it, the server's own) is
# private from its first byte, never made private after
umask 077
action="${1:-start}"
prefect="${PREFECT_BIN:-$(command -v prefect)}"
python="$(dirname "$prefect")/python"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
state="${AR_SERVER_DIR:-$HOME/.activate-ray/prefect-server}"
mkdir -p "$state"
chmod 700 "$state"  # a dir made before this script was

# set NAME=VALUE... / unset NAME...: the current profile, values read from the environment.
# Written as Prefect's save_profiles writes it, but into a new 0600 file renamed over the
# old one: Prefect writes an existing profiles file in place, keeping whatever mode it had.
profile() {
    "$python" - "$repo" "$@" <<'PY'
import os, sys
from pathlib import Path
import toml
from prefect.settings import get_current_settings, load_current_profile, load_profiles
from prefect.settings.profiles import DEFAULT_PROFILES_PATH
sys.path.insert(0, sys.argv[1])
from tasks.atomic_file import write_text_atomic
action, names = sys.argv[2], sys.argv[3:]
profiles, name = load_profiles(), load_current_profile().name
if name not in profiles.names:
    profiles.add_profile(load_current_profile())
# None drops a setting from the profile (as `prefect config unset` does)
profiles.update_profile(name, {n: (os.environ[n] if action == "set" else None) for n in names})
path = Path(get_current_settings().profiles_path).expanduser()
path.parent.mkdir(parents=True, exist_ok=True)
write_text_atomic(path, toml.dumps(profiles.without_profile_source(DEFAULT_PROFILES_PATH).to_dict()), 0o600)
PY
}

# Whether the recorded pid is this user's server, started here: an integer > 1 (a pid file
# reading 1 must never make `stop` run `kill -- -1`), a process of this user's whose
# command line is a Prefect server on the recorded port. Anything else is never signalled.
running() {
    local pid port
    [ -s "$state/pid" ] && [ -s "$state/url" ] || return 1
    pid="$(cat "$state/pid")"
    case "$pid" in '' | 0* | *[!0-9]*) return 1 ;; esac
    [ "${#pid}" -le 9 ] && [ "$pid" -gt 1 ] || return 1
    port="$(sed -n 's|^http://127\.0\.0\.1:\([0-9]*\)/api$|\1|p' "$state/url")"
    [ -n "$port" ] || return 1
    # effective and real uid this user's, and the leader of its own group (what `stop` signals)
    [ "$(ps -o uid=,ruid=,pgid= -p "$pid" 2>/dev/null | xargs)" = "$(id -u) $(id -u) $pid" ] || return 1
    case "$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" in
        *" server start "*"--port $port "* | *" server start "*"--port $port") return 0 ;;
    esac
    return 1
}

# the secret read from its file by the probe itself: never an argument
healthy() {
    "$python" - "$1" "$state/auth" <<'PY'
import base64, sys, urllib.request
from pathlib import Path
secret = Path(sys.argv[2]).read_text().strip()
request = urllib.request.Request(f"{sys.argv[1]}/health",
                                 headers={"Authorization": "Basic " + base64.b64encode(secret.encode()).decode()})
try:
    with urllib.request.urlopen(request, timeout=5) as response:
        sys.exit(0 if response.status == 200 else 1)
except Exception:
    sys.exit(1)
PY
}

case "$action" in
    status)
        if running; then echo "PREFECT_SERVER=running $(cat "$state/url")"; else echo "PREFECT_SERVER=stopped"; fi
        ;;
    start)
        if running; then
            echo "PREFECT_SERVER=already running $(cat "$state/url")"
        else
            port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
            "$python" -c 'import secrets; print("activate-ray:" + secrets.token_hex(24))' >"$state/auth"
            url="http://127.0.0.1:$port/api"
            printf '%s\n' "$url" >"$state/url"
            # the secret reaches the server through its environment (only this user can read it), never argv
            PREFECT_SERVER_API_AUTH_STRING="$(cat "$state/auth")" PREFECT_SERVER_ANALYTICS_ENABLED=false \
                setsid nohup "$prefect" server start --host 127.0.0.1 --port "$port" \
                >"$state/server.log" 2>&1 </dev/null &
            server_pid=$!
            echo "$server_pid" >"$state/pid"
            for _ in $(seq 1 360); do
                healthy "$url" && break
                # our own child (until its exec the command line is still this script's)
                kill -0 "$server_pid" 2>/dev/null || { tail -n 20 "$state/server.log" >&2; echo "the Prefect server did not start" >&2; exit 1; }
                sleep 0.5
            done
            healthy "$url" || { echo "the Prefect server did not answer in 180 s" >&2; exit 1; }
            echo "PREFECT_SERVER=started $url (log: $state/server.log)"
        fi
        PREFECT_API_URL="$(cat "$state/url")" PREFECT_API_AUTH_STRING="$(cat "$state/auth")" \
            profile set PREFECT_API_URL PREFECT_API_AUTH_STRING
        echo "PREFECT_API_URL=$(cat "$state/url") is set in your Prefect profile: runs use it and show in its UI"
        ;;
    stop)
        if running; then
            kill -TERM -- "-$(cat "$state/pid")" 2>/dev/null || true
            for _ in $(seq 1 100); do running || break; sleep 0.1; done
            ! running || kill -KILL -- "-$(cat "$state/pid")" 2>/dev/null || true
        fi
        profile unset PREFECT_API_URL PREFECT_API_AUTH_STRING
        rm -f "$state/pid" "$state/url" "$state/auth"
        echo "PREFECT_SERVER=stopped (PREFECT_API_URL removed from your Prefect profile)"
        ;;
    *)
        echo "usage: prefect_server.sh start|stop|status" >&2
        exit 2
        ;;
esac
