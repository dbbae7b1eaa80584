#!/usr/bin/env bash
# Find a Python with the requested Ray, or build a venv with it (on the
# login host, never on a compute node: those often have no internet).
# Prints RAY_PYTHON=..., RAY_BIN=... and RAY_ENV_SOURCE=reused|created.
# usage: setup_ray.sh RAY_VERSION WORK_DIR [CANDIDATE_PYTHON...]
#   env: AR_REQUIREMENTS (a requirements file on this host), AR_REQ_HASH,
#        AR_SETUP_COMMANDS (the user's setup_commands, a file: run first)
set -euo pipefail
version="$1" work_dir="$2"
shift 2
if [ -n "${AR_SETUP_COMMANDS:-}" ]; then
    # shellcheck disable=SC1091
    . "$(dirname "$0")/site_setup.sh" "$AR_SETUP_COMMANDS"
    # what the setup put on PATH (a module's or conda env's Python) is a candidate too
    set -- "$@" "$(command -v python3 || true)"
fi
req="${AR_REQUIREMENTS:-}"
venv="$work_dir/venvs/ray-$version${AR_REQ_HASH:+-$AR_REQ_HASH}"

has_ray() {  # cheap: package metadata, no `import ray`
    [ -x "$1" ] && [ -x "$(dirname "$1")/ray" ] &&
        "$1" -c 'import sys, importlib.metadata as m; sys.exit(m.version("ray") != sys.argv[1])' "$version" 2>/dev/null
}

for candidate in "$@" "$venv/bin/python"; do
    [ -n "$candidate" ] || continue
    [ -d "$candidate" ] && candidate="$candidate/bin/python"
    if has_ray "$candidate" && { [ -z "$req" ] || [ -e "$(dirname "$candidate")/../.ar-req-$AR_REQ_HASH" ]; }; then
        printf 'RAY_PYTHON=%s\nRAY_BIN=%s\nRAY_ENV_SOURCE=reused\n' "$candidate" "$(dirname "$candidate")/ray"
        exit 0
    fi
done

# Two runs building the same venv at once: the second waits, then reuses it.
mkdir -p "$work_dir/venvs"
exec 9>"$venv.lock"
flock 9
if has_ray "$venv/bin/python" && { [ -z "$req" ] || [ -e "$venv/.ar-req-$AR_REQ_HASH" ]; }; then
    printf 'RAY_PYTHON=%s\nRAY_BIN=%s\nRAY_ENV_SOURCE=reused\n' "$venv/bin/python" "$venv/bin/ray"
    exit 0
fi
base="$(command -v python3.11 || command -v python3)"
echo "creating $venv with ray[default]==$version using $base" >&2
rm -rf "$venv"
trap 'rm -rf "$venv" "$venv.lock"' EXIT  # a failed build leaves nothing half-made
"$base" -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check "ray[default]==$version" ${req:+-r "$req"} >&2
[ -z "$req" ] || touch "$venv/.ar-req-$AR_REQ_HASH"
trap - EXIT
rm -f "$venv.lock"
printf 'RAY_PYTHON=%s\nRAY_BIN=%s\nRAY_ENV_SOURCE=created\n' "$venv/bin/python" "$venv/bin/ray"
