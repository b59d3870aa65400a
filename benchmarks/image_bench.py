"""The image: its size, what BCC's LLVM costs in it, how long a build takes, and ztunnel's cold
start to ready inside it. Prints figures; judges nothing.

- build: `meshctl image build` timed, with the Debian layer cached (the usual rebuild after a
  code change) and, with `--full-build`, from an empty cache (mmdebstrap downloads and
  installs every package: what a fresh CI machine pays);
- size: the archive, each layer (gzip and tar), the unpacked rootfs;
- BCC: the Debian packages in the image only because of python3-bpfcc (LLVM, clang's
  libraries and what they pull), with their installed and gzip sizes: what shipping the
  compiled BPF object instead, with no compiler on the node, would remove;
- cold start: from the runtime's `run` to ztunnel's `/healthz/ready` answering 200, in a
  network namespace made for the run, with `--redirect none` and with `--redirect bpf` (BCC
  compiles bpf/redirect.bpf.c before ztunnel is ready), each also for this tree's ztunnel on
  the host's Python for comparison. Page cache warm (each figure is the median of `--runs`).

    python -m benchmarks.image_bench [--archive FILE] [--runs 3] [--full-build]

Needs root (mmdebstrap, chroot, netns, runc/crun, bpffs). Cleans up its netns, containers,
cgroups and pins.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

from meshctl import image
from meshctl.lab import container as ctr
from meshctl.lab.system import http_get_in_netns

REPO_ROOT = Path(__file__).resolve().parents[1]
READY = 15021
MIB = 1024 * 1024


def _mib(n: float) -> str:
    return f"{n / MIB:.1f} MiB"


# -- build and size --------------------------------------------------------------------------


def build(out: Path, cache: Path | None) -> image.BuildResult:
    return image.build_image(out, cache_dir=cache, log=lambda m: print(f"  {m}", flush=True))


def du(root: Path) -> int:
    total = 0
    seen: set[tuple[int, int]] = set()
    for d, _, files in os.walk(root):
        for f in files:
            st = os.lstat(os.path.join(d, f))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def _dpkg_status(rootfs: Path) -> dict[str, dict[str, str]]:
    pkgs: dict[str, dict[str, str]] = {}
    for para in (rootfs / "var/lib/dpkg/status").read_text().split("\n\n"):
        fields: dict[str, str] = {}
        key = ""
        for line in para.splitlines():
            if line.startswith((" ", "\t")) and key:
                fields[key] += "\n" + line
            elif ":" in line:
                key, _, val = line.partition(":")
                fields[key] = val.strip()
        if "Package" in fields and "installed" in fields.get("Status", ""):
            pkgs[fields["Package"]] = fields
    return pkgs


def _closure(pkgs: dict[str, dict[str, str]], roots: list[str]) -> set[str]:
    provides: dict[str, str] = {}
    for name, f in pkgs.items():
        for p in f.get("Provides", "").split(","):
            if p.strip():
                provides.setdefault(p.split("(")[0].strip(), name)
    out: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        name = name if name in pkgs else provides.get(name, "")
        if not name or name in out:
            continue
        out.add(name)
        f = pkgs[name]
        for field in ("Depends", "Pre-Depends"):
            for alt in f.get(field, "").split(","):
                for choice in alt.split("|"):
                    dep = choice.split("(")[0].split(":")[0].strip()
                    if dep in pkgs or dep in provides:
                        todo.append(dep)
                        break
    return out


def bcc_cost(rootfs: Path, packages: list[str]) -> tuple[list[tuple[str, int]], int, int]:
    """The packages only python3-bpfcc needs (not needed by the rest of the list nor by
    the essential set), their installed bytes and their bytes gzipped."""
    pkgs = _dpkg_status(rootfs)
    essential = [n for n, f in pkgs.items() if f.get("Essential") == "yes"]
    rest = _closure(pkgs, [p for p in packages if p != "python3-bpfcc"] + essential)
    only = sorted(_closure(pkgs, ["python3-bpfcc"]) - rest)
    sizes: list[tuple[str, int]] = []
    raw = gz = 0
    for name in only:
        size = 0
        for list_file in (rootfs / "var/lib/dpkg/info").glob(f"{name}*.list"):
            if list_file.name not in (f"{name}.list", f"{name}:amd64.list"):
                continue
            for line in list_file.read_text().splitlines():
                p = rootfs / line.lstrip("/")
                if p.is_file() and not p.is_symlink():
                    data = p.read_bytes()
                    size += len(data)
                    gz += len(zlib.compress(data, 6))
        sizes.append((name, size))
        raw += size
    return sorted(sizes, key=lambda t: -t[1]), raw, gz


# -- cold start ------------------------------------------------------------------------------


@contextlib.contextmanager
def scratch_netns(name: str) -> Iterator[str]:
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def wait_ready(netns: str, proc: subprocess.Popen[bytes], t0: float, timeout: float) -> float:
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"exited {proc.returncode} before ready")
        try:
            http_get_in_netns(netns, "127.0.0.1", READY, "/healthz/ready", timeout=0.5)
            return time.monotonic() - t0
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"not ready within {timeout:.0f} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def ztunnel_args(work: Path, redirect: str, pins: Path, cgroup: Path) -> list[str]:
    """`cgroup`: where ztunnel attaches its node programs, a parent of its own (the runtime
    removes a container's cgroup, and programs on a removed cgroup outlive the run)."""
    args = [
        "--node", "n1", "--config", str(work / "mesh.yaml"), "--ca-dir", str(work / "ca"),
        "--hbone-addr", "127.0.0.1:15008", "--admin-addr", "127.0.0.1:15000",
        "--metrics-addr", "127.0.0.1:15020", "--readiness-addr", f"127.0.0.1:{READY}",
        "--redirect", redirect,
    ]  # fmt: skip
    if redirect == "bpf":
        args += ["--bpf-pin-root", str(pins), "--bpf-cgroup", str(cgroup)]
    return args


def cold_starts(img: ctr.UnpackedImage, work: Path, runs: int, tag: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    pins_root = Path("/sys/fs/bpf") / f"ambientmesh-{tag}"
    cg_rel = f"ambientmesh-{tag}"
    cg = Path(ctr_cgroup_root()) / cg_rel
    cg.mkdir(parents=True, exist_ok=True)
    with scratch_netns(tag) as ns:
        netns_path = f"/var/run/netns/{ns}"
        for redirect in ("none", "bpf"):
            for where in ("image", "host"):
                key = f"{where}, --redirect {redirect}"
                for i in range(runs):
                    pins = pins_root / f"{where}-{redirect}-{i}"
                    name = f"{tag}-{where}-{redirect}-{i}"
                    c = None
                    if where == "image":
                        c = ctr.Container(
                            name, img, ["ztunnel", *ztunnel_args(work, redirect, pins, cg)],
                            work / "bundles" / name, netns=netns_path, privileged=True, user=0,
                            mounts=ctr.ztunnel_mounts(work), cgroup=f"{cg_rel}/{name}",
                        )  # fmt: skip
                        argv = c.argv()
                        env = None
                    else:
                        cg.mkdir(parents=True, exist_ok=True)
                        zt = [sys.executable, "-m", "ztunnel.main",
                              *ztunnel_args(work, redirect, pins, cg)]  # fmt: skip
                        argv = [sys.executable, "-m", "meshctl.lab.podexec", "--netns", ns,
                                "--cgroup", str(cg), "--", *zt]  # fmt: skip
                        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
                    log = open(work / f"{name}.log", "wb")  # noqa: SIM115
                    t0 = time.monotonic()
                    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
                    try:
                        out.setdefault(key, []).append(wait_ready(ns, proc, t0, 120))
                    except RuntimeError as exc:
                        tail = (work / f"{name}.log").read_text()[-1500:]
                        print(f"  {key}: {exc}\n{tail}", flush=True)
                    finally:
                        stop(proc)
                        log.close()
                        if c is not None:
                            c.delete()
                        shutil.rmtree(pins, ignore_errors=True)
    shutil.rmtree(pins_root, ignore_errors=True)
    with contextlib.suppress(OSError):
        cg.rmdir()
    ctr.remove_v1_cgroups(cg_rel)
    return out


def ctr_cgroup_root() -> str:
    from bpf.mounts import default_cgroup_root

    return str(default_cgroup_root())


def init_ca(img: ctr.UnpackedImage, work: Path, tag: str) -> None:
    """The CA created by the image's own meshctl, as the unprivileged user."""
    ca = work / "ca-parent"
    ca.mkdir()
    os.chown(ca, ctr.NONROOT, ctr.NONROOT)
    c = ctr.Container(
        f"{tag}-ca",
        img,
        ["meshctl", "ca", "init", str(ca / "ca")],
        work / "bundles" / f"{tag}-ca",
        mounts=[ctr.BindMount(str(ca), str(ca))],
    )
    try:
        subprocess.run(c.argv(), check=True, capture_output=True)
    finally:
        c.delete()
    shutil.copytree(ca / "ca", work / "ca")
    (work / "mesh.yaml").write_text(
        "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\n"
        "status: {addresses: [{type: InternalIP, address: 127.0.0.1}]}\n"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="image_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--archive", type=Path, help="an archive already built (skips the build)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--full-build", action="store_true",
                    help="also time a build from an empty Debian layer cache")  # fmt: skip
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("image_bench: needs root", file=sys.stderr)
        return 2
    tag = f"imgbench{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="ambientmesh-imgbench-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        archive = args.archive
        if args.full_build:
            print("build, empty cache:", flush=True)
            res = build(work / "full.oci.tar", work / "cache")
            print(f"  {res.seconds['total']:.0f} s ({json.dumps(_round(res.seconds))})")
            shutil.rmtree(work / "cache")
        if archive is None:
            print("build, Debian layer cached (built first if not):", flush=True)
            build(work / "warm.oci.tar", None)
            res = build(work / "img.oci.tar", None)
            print(f"  {res.seconds['total']:.0f} s ({json.dumps(_round(res.seconds))})")
            archive = res.archive
        img = ctr.unpack(archive, work / "unpacked")
        print(f"\nimage {', '.join(img.refs)}\n  manifest {img.digest}")
        print(f"  archive {_mib(archive.stat().st_size)}, unpacked {_mib(du(img.rootfs))}")
        manifest = _manifest_layers(archive)
        for digest, size in manifest:
            print(f"  layer {digest[:19]} {_mib(size)} gzip")
        pk = image.read_packages()
        only, raw, gz = bcc_cost(img.rootfs, pk)
        print(f"\nBCC's share (packages only python3-bpfcc brings): {_mib(raw)} installed, "
              f"~{_mib(gz)} gzip")  # fmt: skip
        for name, size in only:
            if size >= MIB:
                print(f"  {name:24} {_mib(size)}")
        init_ca(img, work, tag)
        print(f"\nztunnel cold start to ready (median of {args.runs}, page cache warm):")
        for key, times in cold_starts(img, work, args.runs, tag).items():
            if not times:
                continue
            med = statistics.median(times)
            print(f"  {key:28} {med:6.2f} s   (runs: {', '.join(f'{t:.2f}' for t in times)})")
    return 0


def _manifest_layers(archive: Path) -> list[tuple[str, int]]:
    import tarfile

    with tarfile.open(archive) as tar:
        index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
        d = index["manifests"][0]["digest"].split(":")[1]
        man = json.load(tar.extractfile(f"blobs/sha256/{d}"))  # type: ignore[arg-type]
    return [(la["digest"], int(la["size"])) for la in man["layers"]]


def _round(d: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 1) for k, v in d.items()}


if __name__ == "__main__":
    sys.exit(main())
