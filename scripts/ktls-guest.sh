#!/usr/bin/env bash
# Runs tests/ktls inside Debian's stock kernel (which has kTLS) under QEMU, booted once with
# this machine's files (virtme-ng), and returns the guest pytest's exit status. With --demo it
# also runs `meshctl lab demo` there (a machine no earlier run touched: no bpffs mounted,
# unified cgroup v2, kTLS on the HBONE connections), with --bench benchmarks/ktls_bench.py,
# all in the same boot. With --bench-json PATH it runs `meshctl bench`'s guest part
# (benchmarks/ktls_guest.py; --quick for its short preset) and writes the figures to PATH, which
# the guest may write (the one directory shared read-write); --no-tests leaves the tests out.
# Exits 0 with "SKIPPED: ..." only where QEMU cannot run at all; a missing guest kernel or vng
# is a setup error (scripts/setup.sh).
#
#   scripts/ktls-guest.sh [--no-tests] [--demo] [--bench] [--bench-json PATH [--quick]]
#                         [extra pytest args...]
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
flags=""
vngargs=()
while :; do
  case "${1:-}" in
    --bench|--demo|--no-tests|--quick) flags="$flags $1"; shift ;;
    --bench-json)
      [ $# -ge 2 ] || { echo "ktls-guest: --bench-json needs a path" >&2; exit 2; }
      out=$(realpath -m "$2") && mkdir -p "$(dirname "$out")" || exit 2
      flags="$flags --bench-json $(printf %q "$out")"
      vngargs+=(--rwdir "$(dirname "$out")")
      shift 2 ;;
    *) break ;;
  esac
done

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
"$vng" --run "$kernel" --user root --disable-kvm --cpus 2 --memory 2G ${vngargs[@]+"${vngargs[@]}"} \
  --exec "$guest" 2>&1 | tee
rc=${PIPESTATUS[0]}
echo "ktls-guest: guest finished with status $rc in $(( $(date +%s) - start )) s"
exit "$rc"
