#!/usr/bin/env bash
# Runs tests/ktls inside Debian's stock kernel (which has kTLS) under QEMU, booted once with
# this machine's files (virtme-ng), and returns the guest pytest's exit status. With --demo it
# also runs `meshctl lab demo` there (a machine no earlier run touched: no bpffs mounted,
# unified cgroup v2, kTLS on the HBONE connections), with --bench benchmarks/ktls_bench.py,
# all in the same boot. Exits 0 with "SKIPPED: ..." only
# where QEMU cannot run at all; a missing guest kernel or vng is a setup error (scripts/setup.sh).
#
#   scripts/ktls-guest.sh [--demo] [--bench] [extra pytest args...]
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
flags=""
while [ "${1:-}" = "--bench" ] || [ "${1:-}" = "--demo" ]; do flags="$flags $1"; shift; done

skip() { echo "SKIPPED: QEMU cannot run here: $1"; exit 0; }
fail() { echo "ktls-guest: $1" >&2; exit 1; }

qemu=$(command -v qemu-system-x86_64) || skip "qemu-system-x86_64 is not installed (MESH_SETUP_KTLS=0?)"
[ "$(uname -m)" = x86_64 ] || skip "host is $(uname -m), the guest kernel is amd64"
# QEMU must at least start (TCG, no KVM): a sandbox that forbids it is the one legitimate skip.
qemu_err=$(timeout 5 "$qemu" -machine none -display none -nodefaults -no-user-config \
             -monitor none -serial none -S 2>&1 </dev/null)
qemu_rc=$?
[ "$qemu_rc" = 124 ] || skip "qemu-system-x86_64 does not start (exit $qemu_rc): ${qemu_err:-no output}"

py=$(python3 -c 'import sys; print(sys.executable)')
vng=$(command -v vng) || fail "vng not found: pip install virtme-ng (scripts/setup.sh does)"
kernel=${KTLS_GUEST_KERNEL:-$(ls /boot/vmlinuz-*-amd64 2>/dev/null | sort -V | tail -n 1)}
[ -n "$kernel" ] && [ -r "$kernel" ] || fail "no Debian guest kernel in /boot: apt-get install linux-image-amd64"

pyargs="$flags"
[ $# -gt 0 ] && pyargs="$pyargs$(printf ' %q' "$@")"
guest="modprobe tls 2>/dev/null; cd $(printf %q "$root") && PYTHONPATH=$(printf %q "$root") \
  $(printf %q "$py") -m tests.ktls.guest_main$pyargs"

echo "ktls-guest: booting $(basename "$kernel") under QEMU (TCG, no KVM)"
start=$(date +%s)
"$vng" --run "$kernel" --user root --disable-kvm --cpus 2 --memory 2G --exec "$guest" 2>&1 | tee
rc=${PIPESTATUS[0]}
echo "ktls-guest: guest finished with status $rc in $(( $(date +%s) - start )) s"
exit "$rc"
