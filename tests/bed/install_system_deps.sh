#!/usr/bin/env bash
# The Debian packages the real test bed needs: Slurm + munge, the PBS
# command wrappers, OpenSSH, rootless podman. Installs only what is missing; needs root.
set -euo pipefail
packages=(slurm-wlm munge slurm-wlm-torque openssh-server openssh-sftp-server openssh-client iproute2 procps psmisc util-linux tini python3.11 shellcheck
    podman runc uidmap catatonit)  # the container option's bed test: rootless podman
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
[ "${#missing[@]}" -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "missing packages (${missing[*]}); run as root to install them, or the bed tests will skip" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
