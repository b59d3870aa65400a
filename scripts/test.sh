#!/usr/bin/env bash
# The test command: every layer that can run on this machine (unit, integration, e2e as root,
# interop with a real Envoy), then the kTLS tests inside a guest kernel that has kTLS.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pytest -q -p no:cacheprovider "$@"
