#!/usr/bin/env bash
# Prepares a fresh Debian 12 machine (root) for the mesh: system packages, kernel headers for
# BCC, and this project in editable mode with its dev tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_pkgs=(python3-bpfcc bpfcc-tools linux-headers-amd64 containernetworking-plugins iproute2
          iptables procps psmisc
          # the container image: built from Debian packages (meshctl image build), run by the
          # lab and its tests with an OCI runtime, loaded by podman and containerd (as kind
          # load does) in tests/e2e/image
          mmdebstrap runc podman containerd
          # meshctl observe: the service map is laid out by graphviz, and the live UI is
          # tested in a real headless Chromium (tests/integration/meshctl/test_observe_ui.py)
          graphviz chromium)
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

python3 -m pip install -q --disable-pip-version-check -e '.[dev]'
# Every safe fix for this node (cgroup v2 and bpffs mounted, Debian's kernel headers linked
# for BCC, the tls module loaded), then the checks: a fresh machine often has no bpffs at
# /sys/fs/bpf, and this kernel ships no headers. Fails, naming the fix, if a required one fails.
python3 -m meshctl doctor --fix
echo "setup: done"
