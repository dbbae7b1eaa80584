#!/usr/bin/env bash
# Print the OpenPBS kit's directory (unmodified OpenPBS source, its build and start scripts:
# see its README): ACTIVATE_RAY_OPENPBS_KIT, else ../shared/openpbs beside the checkout, else
# the machine's /work/shared/openpbs. Exit 1 when there is none.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
for kit in "${ACTIVATE_RAY_OPENPBS_KIT:-}" "$here/../../../shared/openpbs" /work/shared/openpbs; do
    if [ -n "$kit" ] && [ -f "$kit/build.sh" ] && [ -f "$kit/up.sh" ]; then
        cd "$kit" && pwd
        exit 0
    fi
done
echo "no OpenPBS kit (set ACTIVATE_RAY_OPENPBS_KIT to the directory with build.sh and up.sh)" >&2
exit 1
