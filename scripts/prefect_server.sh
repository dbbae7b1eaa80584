#!/usr/bin/env bash
# A lasting Prefect server of this user's, for runs that skip the temporary server
# (about 15 s of every run) and show in a UI: on loopback only, on a free port
# (never a fixed one: on a shared login node 4200 may be someone else's), with a
# random basic-auth secret, since every user of the machine reaches loopback.
# `start` writes PREFECT_API_URL and the secret into the current Prefect profile
# (0600), so later runs use it; `stop` stops it and removes both again.
# usage: prefect_server.sh start|stop|status
#   env: PREFECT_BIN (the prefect CLI; its python is used too), AR_SERVER_DIR
set -euo pipefail
action="${1:-start}"
prefect="${PREFECT_BIN:-$(command -v prefect)}"
python="$(dirname "$prefect")/python"
state="${AR_SERVER_DIR:-$HOME/.activate-ray/prefect-server}"
mkdir -p "$state"
chmod 700 "$state"

# set NAME=VALUE... / unset NAME...: the current profile, values read from the environment
profile() {
    "$python" - "$@" <<'PY'
import os, sys
from pathlib import Path
from prefect.settings import get_current_settings, load_current_profile, load_profiles, save_profiles
action, names = sys.argv[1], sys.argv[2:]
profiles, name = load_profiles(), load_current_profile().name
if name not in profiles.names:
    profiles.add_profile(load_current_profile())
# None drops a setting from the profile (as `prefect config unset` does)
profiles.update_profile(name, {n: (os.environ[n] if action == "set" else None) for n in names})
save_profiles(profiles)
path = Path(get_current_settings().profiles_path).expanduser()
if path.exists():
    path.chmod(0o600)  # it holds the server's secret
PY
}

running() {
    [ -s "$state/pid" ] && kill -0 "$(cat "$state/pid")" 2>/dev/null
}

healthy() {
    "$python" - "$1" "$2" <<'PY'
import base64, sys, urllib.request
request = urllib.request.Request(f"{sys.argv[1]}/health",
                                 headers={"Authorization": "Basic " + base64.b64encode(sys.argv[2].encode()).decode()})
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
            (umask 077 && "$python" -c 'import secrets; print("activate-ray:" + secrets.token_hex(24))' >"$state/auth")
            url="http://127.0.0.1:$port/api"
            printf '%s\n' "$url" >"$state/url"
            # the secret reaches the server through its environment (only this user can read it), never argv
            PREFECT_SERVER_API_AUTH_STRING="$(cat "$state/auth")" PREFECT_SERVER_ANALYTICS_ENABLED=false \
                setsid nohup "$prefect" server start --host 127.0.0.1 --port "$port" \
                >"$state/server.log" 2>&1 </dev/null &
            echo "$!" >"$state/pid"
            for _ in $(seq 1 360); do
                healthy "$url" "$(cat "$state/auth")" && break
                running || { tail -n 20 "$state/server.log" >&2; echo "the Prefect server did not start" >&2; exit 1; }
                sleep 0.5
            done
            healthy "$url" "$(cat "$state/auth")" || { echo "the Prefect server did not answer in 180 s" >&2; exit 1; }
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
