#!/usr/bin/env bash
# Prepares a fresh Debian 12 machine (root) for the mesh: system packages, kernel headers for
# BCC, and this project in editable mode with its dev tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_pkgs=(python3-bpfcc bpfcc-tools linux-headers-amd64 containernetworking-plugins iproute2
          iptables procps psmisc)
if [ "${MESH_SETUP_KTLS:-1}" = 1 ]; then
  apt_pkgs+=(qemu-system-x86 linux-image-amd64 busybox-static)
fi
missing=()
for p in "${apt_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

# BCC compiles against kernel headers; this kernel ships none, and Debian's 6.1 headers serve
# our programs, which touch only UAPI structures.
kver=$(uname -r)
if [ ! -e "/lib/modules/$kver/build" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  common=${hdr%-amd64}-common
  if [ -n "$hdr" ] && [ -d "$common" ]; then
    mkdir -p "/lib/modules/$kver"
    ln -sfn "$hdr" "/lib/modules/$kver/build"
    ln -sfn "$common" "/lib/modules/$kver/source"
    echo "setup: linked /lib/modules/$kver/build -> $hdr"
  fi
fi

python3 -m pip install -q --disable-pip-version-check -e '.[dev]'
echo "setup: done"
