"""The bpf(2) commands a running ztunnel needs, through ctypes: get a pinned program, pin one,
attach it to a cgroup, detach it.

Why not BCC for these: compiling the programs loads LLVM into the process, about 100 MiB of
RSS that would stay in ztunnel for its whole life (measured: 48 MiB without BCC, 149 MiB after
one compile). So a short-lived `python -m bpf.loader load` compiles, loads and pins, and
ztunnel attaches the pinned programs with these four syscalls.
"""

from __future__ import annotations

import ctypes
import os

_NR_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine, 321)

# enum bpf_cmd (include/uapi/linux/bpf.h)
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9

# enum bpf_attach_type: the ones our programs use (checked against BCC's in the tests)
ATTACH_TYPES = {
    "connect4": 10,  # BPF_CGROUP_INET4_CONNECT
    "getpeername4": 29,  # BPF_CGROUP_INET4_GETPEERNAME
    "connect6": 11,  # BPF_CGROUP_INET6_CONNECT
    "getpeername6": 30,  # BPF_CGROUP_INET6_GETPEERNAME
    "sockops": 3,  # BPF_CGROUP_SOCK_OPS
    "getsockopt": 21,  # BPF_CGROUP_GETSOCKOPT
}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _ObjAttr(ctypes.Structure):
    _fields_ = [
        ("pathname", ctypes.c_uint64),
        ("bpf_fd", ctypes.c_uint32),
        ("file_flags", ctypes.c_uint32),
    ]


class _AttachAttr(ctypes.Structure):
    _fields_ = [
        ("target_fd", ctypes.c_uint32),
        ("attach_bpf_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("attach_flags", ctypes.c_uint32),
        ("replace_bpf_fd", ctypes.c_uint32),
    ]


def _bpf(cmd: int, attr: ctypes.Structure, what: str) -> int:
    ret = int(_libc.syscall(_NR_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def obj_get(path: str) -> int:
    """A new fd for the program or map pinned at `path` (the caller closes it)."""
    name = os.fsencode(path)
    attr = _ObjAttr(pathname=ctypes.cast(ctypes.c_char_p(name), ctypes.c_void_p).value or 0)
    return _bpf(BPF_OBJ_GET, attr, f"BPF_OBJ_GET {path}")


def obj_pin(fd: int, path: str) -> None:
    name = os.fsencode(path)
    attr = _ObjAttr(
        pathname=ctypes.cast(ctypes.c_char_p(name), ctypes.c_void_p).value or 0, bpf_fd=fd
    )
    _bpf(BPF_OBJ_PIN, attr, f"BPF_OBJ_PIN {path}")


def prog_attach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    """Flags 0: one program of this type on the cgroup, replaced by the next attach (what
    makes enrolment idempotent)."""
    attr = _AttachAttr(target_fd=target_fd, attach_bpf_fd=prog_fd, attach_type=attach_type)
    _bpf(BPF_PROG_ATTACH, attr, "BPF_PROG_ATTACH")


def prog_detach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    attr = _AttachAttr(target_fd=target_fd, attach_bpf_fd=prog_fd, attach_type=attach_type)
    _bpf(BPF_PROG_DETACH, attr, "BPF_PROG_DETACH")


BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15


class _InfoAttr(ctypes.Structure):
    _fields_ = [
        ("bpf_fd", ctypes.c_uint32),
        ("info_len", ctypes.c_uint32),
        ("info", ctypes.c_uint64),
    ]


class _GetFdByIdAttr(ctypes.Structure):
    _fields_ = [
        ("id", ctypes.c_uint32),
        ("next_id", ctypes.c_uint32),
        ("open_flags", ctypes.c_uint32),
    ]


def obj_id(fd: int) -> int:
    """The kernel-wide id of the program or map behind `fd` (bpf_prog_info and bpf_map_info
    both start with `__u32 type, id`). Ids are allocated cyclically, so one that disappears
    stays gone: `uninstall` and `lab down` are checked with it."""
    buf = (ctypes.c_uint32 * 2)()
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(buf), info=ctypes.addressof(buf))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "BPF_OBJ_GET_INFO_BY_FD")
    return int(buf[1])


def exists(kind: str, ident: int) -> bool:
    """Whether the kernel still holds program (`kind` "prog") or map ("map") `ident`."""
    cmd = BPF_PROG_GET_FD_BY_ID if kind == "prog" else BPF_MAP_GET_FD_BY_ID
    try:
        fd = _bpf(cmd, _GetFdByIdAttr(id=ident), f"BPF_{kind.upper()}_GET_FD_BY_ID {ident}")
    except OSError as exc:
        if exc.errno == 2:  # ENOENT: freed
            return False
        raise
    os.close(fd)
    return True


# Map element commands: ztunnel fills the policy maps and reads the drop counters with these.
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_ANY = 0


class _ElemAttr(ctypes.Structure):
    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),  # next_key for BPF_MAP_GET_NEXT_KEY
        ("flags", ctypes.c_uint64),
    ]


def _elem(cmd: int, fd: int, key: bytes | None, value: ctypes.Array[ctypes.c_char] | None,
          what: str, flags: int = 0) -> int:  # fmt: skip
    kbuf = ctypes.create_string_buffer(key, len(key)) if key is not None else None
    attr = _ElemAttr(
        map_fd=fd,
        key=ctypes.addressof(kbuf) if kbuf is not None else 0,
        value=ctypes.addressof(value) if value is not None else 0,
        flags=flags,
    )
    return _bpf(cmd, attr, what)


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    buf = ctypes.create_string_buffer(value, len(value))
    _elem(BPF_MAP_UPDATE_ELEM, fd, key, buf, "BPF_MAP_UPDATE_ELEM", flags)


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value under `key`, or None when there is none."""
    buf = ctypes.create_string_buffer(value_size)
    try:
        _elem(BPF_MAP_LOOKUP_ELEM, fd, key, buf, "BPF_MAP_LOOKUP_ELEM")
    except OSError as exc:
        if exc.errno == 2:  # ENOENT
            return None
        raise
    return buf.raw


def map_delete(fd: int, key: bytes) -> bool:
    """Delete `key`; False when it was not there."""
    try:
        _elem(BPF_MAP_DELETE_ELEM, fd, key, None, "BPF_MAP_DELETE_ELEM")
    except OSError as exc:
        if exc.errno == 2:
            return False
        raise
    return True


def map_keys(fd: int, key_size: int) -> list[bytes]:
    """Every key of a hash or LPM trie map (a snapshot: keys deleted meanwhile may be skipped
    or listed, which callers tolerate)."""
    keys: list[bytes] = []
    cur: bytes | None = None
    nxt = ctypes.create_string_buffer(key_size)
    while True:
        try:
            _elem(BPF_MAP_GET_NEXT_KEY, fd, cur, nxt, "BPF_MAP_GET_NEXT_KEY")
        except OSError as exc:
            if exc.errno == 2:  # ENOENT: past the last key
                return keys
            raise
        cur = nxt.raw
        keys.append(cur)


def map_info(fd: int) -> tuple[int, int, int, int]:
    """(type, key_size, value_size, max_entries) of the map behind `fd` (bpf_map_info's
    first six u32: type, id, key_size, value_size, max_entries, map_flags)."""
    buf = (ctypes.c_uint32 * 6)()
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(buf), info=ctypes.addressof(buf))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "BPF_OBJ_GET_INFO_BY_FD")
    return int(buf[0]), int(buf[2]), int(buf[3]), int(buf[4])
