#!/usr/bin/env bash
# What the real test bed needs: Debian's Slurm + munge, the PBS command wrappers (Torque
# flavour), OpenSSH, rootless podman; and OpenPBS, built from the kit's source into
# /opt/pbs (about 4 minutes once; skipped when built). Installs only what is missing; needs root.
set -euo pipefail
packages=(slurm-wlm munge slurm-wlm-torque openssh-server openssh-sftp-server openssh-client iproute2 procps psmisc util-linux tini python3.11 shellcheck strace
    podman runc uidmap catatonit)  # the container option's bed test: rootless podman
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ "$(id -u)" != 0 ]; then
    echo "missing packages (${missing[*]:-none}) or OpenPBS not built; run as root to install them, or the bed tests will skip" >&2
    exit 0
fi
if [ "${#missing[@]}" -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# OpenPBS: the kit's build.sh installs its own build packages and skips a build that is there
kit="$(bash "$(dirname "${BASH_SOURCE[0]}")/openpbs_kit.sh")"
if ! bash "$kit/build.sh" >/var/tmp/activate-ray-openpbs-build.log 2>&1; then
    tail -n 30 /var/tmp/activate-ray-openpbs-build.log >&2
    echo "building OpenPBS failed (whole log: /var/tmp/activate-ray-openpbs-build.log)" >&2
    exit 1
fi
