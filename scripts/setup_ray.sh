#!/usr/bin/env bash
# Find a Python with the requested Ray, or build a venv with it (on the
# login host, never on a compute node: those often have no internet).
# Prints RAY_PYTHON=..., RAY_BIN=... and RAY_ENV_SOURCE=reused|created.
# usage: setup_ray.sh RAY_VERSION WORK_DIR [CANDIDATE_PYTHON...]
#   env: AR_REQUIREMENTS (a requirements file on this host), AR_REQ_HASH,
#        AR_SETUP_COMMANDS (the user's setup_commands, a file: run first),
#        AR_FIND_ONLY=1 (only look: RAY_NOT_FOUND=<the venv it would build> when there is none)
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

# `check` (AR_FIND_ONLY=1): say that none was found, build nothing
if [ "${AR_FIND_ONLY:-0}" = 1 ]; then
    printf 'RAY_NOT_FOUND=%s\n' "$venv"
    exit 0
fi

# Two runs building the same venv at once: the second waits, then reuses it.
mkdir -p "$work_dir/venvs"
exec 9>"$venv.lock"
flock 9
if has_ray "$venv/bin/python" && { [ -z "$req" ] || [ -e "$venv/.ar-req-$AR_REQ_HASH" ]; }; then
    printf 'RAY_PYTHON=%s\nRAY_BIN=%s\nRAY_ENV_SOURCE=reused\n' "$venv/bin/python" "$venv/bin/ray"
    exit 0
fi
base="$(command -v python3.11 || command -v python3)"

# uv builds a venv in seconds where pip takes a minute: the target's own uv, else
# one installed once into the work dir from the index pip uses (AR_UV=0: pip only).
find_uv() {
    [ "${AR_UV:-1}" != 0 ] || return 1
    command -v uv && return 0
    local tools="$work_dir/tools/uv"
    if [ ! -x "$tools/bin/uv" ]; then
        mkdir -p "$work_dir/tools"
        rm -rf "$tools.part"
        (
            exec 8>"$tools.lock"
            flock 8
            [ -x "$tools/bin/uv" ] || "$base" -m pip install --quiet --disable-pip-version-check \
                --target "$tools.part" uv >&2 && mv "$tools.part" "$tools"
        ) || { rm -rf "$tools.part"; return 1; }
    fi
    [ -x "$tools/bin/uv" ] && echo "$tools/bin/uv"
}

# uv reads no pip.conf: hand it the index, extra indexes and links pip would use.
pip_setting() { "$base" -m pip config get "global.$1" 2>/dev/null || true; }
uv_index_args=()
uv_index_options() {
    local index extra links item
    index="${PIP_INDEX_URL:-$(pip_setting index-url)}"
    extra="${PIP_EXTRA_INDEX_URL:-$(pip_setting extra-index-url)}"
    links="${PIP_FIND_LINKS:-$(pip_setting find-links)}"
    [ -z "$index" ] || uv_index_args+=(--default-index "$index")
    # pip picks the best version over all its indexes; uv, by default, stops at the first index
    # that has the package (and then fails on a mirror holding only older releases)
    for item in $extra; do uv_index_args+=(--index "$item"); done
    [ -z "$extra" ] || uv_index_args+=(--index-strategy unsafe-best-match)
    for item in $links; do uv_index_args+=(--find-links "$item"); done
    case "${PIP_NO_INDEX:-}" in 1 | true | yes) uv_index_args+=(--no-index) ;; esac
}

rm -rf "$venv"
trap 'rm -rf "$venv" "$venv.lock"' EXIT  # a failed build leaves nothing half-made
if uv="$(find_uv)"; then
    echo "creating $venv with ray[default]==$version using $base, with uv ($uv)" >&2
    uv_index_options
    "$uv" venv --quiet --python "$base" "$venv" >&2
    # bytecode compiled now, once, so the first `import ray` on every node is not slower
    "$uv" pip install --quiet --compile-bytecode --python "$venv/bin/python" "${uv_index_args[@]}" \
        "ray[default]==$version" ${req:+-r "$req"} >&2
else
    echo "creating $venv with ray[default]==$version using $base, with pip (no uv on this host)" >&2
    "$base" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "ray[default]==$version" ${req:+-r "$req"} >&2
fi
[ -z "$req" ] || touch "$venv/.ar-req-$AR_REQ_HASH"
trap - EXIT
rm -f "$venv.lock"
printf 'RAY_PYTHON=%s\nRAY_BIN=%s\nRAY_ENV_SOURCE=created\n' "$venv/bin/python" "$venv/bin/ray"
