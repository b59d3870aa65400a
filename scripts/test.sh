#!/usr/bin/env bash
# The test command: every layer that can run on this machine (unit, integration, e2e as root,
# interop with a real Envoy), then the kTLS tests inside a guest kernel that has kTLS.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pytest -q -p no:cacheprovider "$@"
# The whole suite (no pytest arguments) also boots the kTLS guest, which runs the kTLS tests
# and the lab demo on a machine state no run touched before; MESH_KTLS_GUEST=0 skips it.
if [ $# -eq 0 ] && [ "${MESH_KTLS_GUEST:-1}" = 1 ]; then
  scripts/ktls-guest.sh --demo
fi
