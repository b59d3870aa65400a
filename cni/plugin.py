"""`ambientmesh-cni`: a chained CNI plugin (spec 1.0.0) enrolling new pods with the node's ztunnel.

The container runtime runs it after the interface plugins (bridge/ptp + IPAM + loopback) with
`CNI_COMMAND`, `CNI_NETNS`, `CNI_CONTAINERID`, `CNI_IFNAME`, `CNI_ARGS` (the kubelet adds
`K8S_POD_NAMESPACE` and `K8S_POD_NAME`) in the environment and the network config, including the
previous plugin's `prevResult`, on stdin. On ADD it tells ztunnel over its enrolment unix socket
(one JSON line each way: `{"op":"add","namespace","name","netns","cgroup"}` →
`{"ok":true}` | `{"ok":false,"error":...}`), so the redirect is in place before the app's
first connect, then prints `prevResult` unchanged: this plugin adds no interface or address.

Decisions, and why:

* ztunnel, which holds the mesh config, decides whether the pod is ambient: it answers `ok`
  with `"enrolled": false` for pods it skips. The plugin carries no policy of its own.
* An ambient pod whose enrolment fails gets an error result (CNI error JSON on stdout, non-zero
  exit): a pod that starts unenrolled would talk in plaintext and bypass policy, so the runtime
  must retry sandbox creation instead (error code 11, "try again later", when ztunnel is down).
* A pod outside the mesh must never be blocked. When ztunnel cannot be reached, the plugin asks
  the API server (with the kubeconfig the installer wrote) whether the pod is ambient
  (namespace label `istio.io/dataplane-mode=ambient`, pod label not `none`, or the pod label
  `ambient`); not ambient → pass. Namespaces in `excludeNamespaces` (kube-system, the mesh's
  own) pass without asking anyone. If neither ztunnel nor the API answers, the plugin cannot
  prove the pod is outside the mesh and fails the ADD (the runtime retries).
  Where the mesh config comes from files instead of an API server (the lab), `meshConfig`
  names the YAML ztunnel reads, and the plugin reads the same labels from it.
* DEL never fails (the spec requires it to be idempotent and best effort); CHECK validates the
  config and prevResult (the enrolment protocol has no check operation).
* The pod's cgroup: from `CNI_ARGS` key `AMBIENT_CGROUP` when the caller knows it (the lab),
  else the cgroup v2 path of a process already inside the pod's netns (the sandbox's pause
  process), else null and ztunnel resolves it itself.

The module uses only the standard library (PyYAML only for a hand-written YAML kubeconfig):
the installer copies this very file to the host's CNI bin dir, where the runtime executes it
with the host's `python3`.

Network config keys (all optional): `enrolSocket` (default /run/ambientmesh/enrol.sock),
`timeoutSeconds` (5), `excludeNamespaces`, `kubeconfig`, `meshConfig`, `cgroupRoot`
(/sys/fs/cgroup), `logFile`.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Any

__all__ = ["CniError", "main", "run"]

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
DEFAULT_SOCKET = "/run/ambientmesh/enrol.sock"
DEFAULT_EXCLUDED = ("kube-system", "ambientmesh-system")
DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode"

# CNI spec error codes
ERR_INCOMPATIBLE_VERSION = 1
ERR_INVALID_NETCONF = 4  # "unsupported field in network configuration" / bad config
ERR_INVALID_ENV = 7
ERR_IO = 5
ERR_TRY_AGAIN_LATER = 11
ERR_ENROLMENT = 100  # plugin-specific codes start at 100


class CniError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details


class _Unreachable(Exception):
    """ztunnel's socket could not be used (absent, refused, timed out, garbled reply)."""


@dataclass(frozen=True)
class Invocation:
    command: str
    container_id: str
    netns: str
    ifname: str
    args: Mapping[str, str]
    conf: Mapping[str, Any]

    @property
    def cni_version(self) -> str:
        return str(self.conf.get("cniVersion", "1.0.0"))


def _parse_args(raw: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in raw.split(";"):
        if "=" in part:
            k, _, v = part.partition("=")
            out[k.strip()] = v.strip()
    return out


def read_invocation(env: Mapping[str, str], stdin: IO[str]) -> Invocation:
    command = env.get("CNI_COMMAND", "")
    if command not in ("ADD", "DEL", "CHECK", "VERSION"):
        raise CniError(
            ERR_INVALID_ENV, f"CNI_COMMAND {command!r} is not ADD, DEL, CHECK or VERSION"
        )
    text = stdin.read()
    try:
        conf = json.loads(text) if text.strip() else {}
    except ValueError as exc:
        raise CniError(ERR_INVALID_NETCONF, f"network config on stdin is not JSON: {exc}") from None
    except RecursionError:
        raise CniError(ERR_INVALID_NETCONF, "network config on stdin nests too deeply") from None
    if not isinstance(conf, dict):
        raise CniError(ERR_INVALID_NETCONF, "network config must be a JSON object")
    if not isinstance(conf.get("cniVersion", ""), str):
        raise CniError(ERR_INVALID_NETCONF, "network config: cniVersion must be a string")
    version = str(conf.get("cniVersion", "1.0.0"))
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            ERR_INCOMPATIBLE_VERSION,
            f"cniVersion {version} is not supported",
            f"supported: {', '.join(SUPPORTED_VERSIONS)}",
        )
    if command in ("ADD", "DEL", "CHECK") and not env.get("CNI_CONTAINERID"):
        raise CniError(ERR_INVALID_ENV, "CNI_CONTAINERID is required")
    if command in ("ADD", "CHECK") and not env.get("CNI_NETNS"):
        raise CniError(ERR_INVALID_ENV, "CNI_NETNS is required")
    _check_conf(conf)
    return Invocation(
        command,
        env.get("CNI_CONTAINERID", ""),
        env.get("CNI_NETNS", ""),
        env.get("CNI_IFNAME", ""),
        _parse_args(env.get("CNI_ARGS", "")),
        conf,
    )


_PATH_KEYS = ("enrolSocket", "kubeconfig", "meshConfig", "cgroupRoot", "logFile")
MAX_TIMEOUT = 300.0


def _check_conf(conf: Mapping[str, Any]) -> None:
    """Our keys of the network config, checked before any is used: a wrong type must be a
    config error the runtime reports, not an exception (a number as `logFile` would even have
    been opened as a file descriptor, closing the plugin's own stdout)."""

    def bad(key: str, want: str) -> CniError:
        return CniError(
            ERR_INVALID_NETCONF, f"network config: {key} must be {want}, not {conf[key]!r:.80}"
        )

    for key in _PATH_KEYS:
        v = conf.get(key)
        if v is not None and (not isinstance(v, str) or not v or "\x00" in v):
            raise bad(key, "a non-empty path string")
    t = conf.get("timeoutSeconds")
    if t is not None and (
        isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t <= MAX_TIMEOUT
    ):
        raise bad("timeoutSeconds", f"a number of seconds in (0, {MAX_TIMEOUT:g}]")
    ex = conf.get("excludeNamespaces")
    if ex is not None and (not isinstance(ex, list) or not all(isinstance(n, str) for n in ex)):
        raise bad("excludeNamespaces", "a list of namespace names")
    prev = conf.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise bad("prevResult", "an object")


class _Log:
    def __init__(self, path: str | None) -> None:
        self.path = path

    def __call__(self, msg: str) -> None:
        line = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} ambientmesh-cni: {msg}\n"
        sys.stderr.write(line)
        if self.path:
            try:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(line)
            except OSError:
                pass


_POD_COMPONENT = re.compile(
    r"pod[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"
)


def pod_level(cgroup_path: str) -> str:
    """Cut a container's cgroup path back to its pod's (`.../pod<uid>/<container>` with the
    cgroupfs driver, `...-pod<uid>.slice/cri-containerd-<id>.scope` with systemd): the redirect
    programs must cover every container of the pod, and the sandbox's own cgroup covers only
    the pause container. A path without a pod component is returned as it is."""
    parts = cgroup_path.rstrip("/").split("/")
    for i in range(len(parts) - 1, -1, -1):
        if _POD_COMPONENT.search(parts[i]):
            return "/".join(parts[: i + 1])
    return cgroup_path


def find_cgroup(netns: str, cgroup_root: str, proc: str = "/proc") -> str | None:
    """The pod-level cgroup v2 directory of a process already inside `netns` (the sandbox)."""
    try:
        st = os.stat(netns)
    except OSError:
        return None
    want = (st.st_dev, st.st_ino)
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            ns = os.stat(f"{proc}/{pid}/ns/net")
            if (ns.st_dev, ns.st_ino) != want:
                continue
            with open(f"{proc}/{pid}/cgroup", encoding="utf-8") as f:
                for line in f:
                    if line.startswith("0::"):
                        rel = line[3:].strip()
                        return pod_level(os.path.join(cgroup_root, rel.lstrip("/")))
        except OSError:
            continue
    return None


def ask_ztunnel(path: str, request: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    """One JSON line to ztunnel's enrolment socket, one JSON line back."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(json.dumps(request).encode() + b"\n")
            buf = b""
            while b"\n" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > 1 << 20:
                    raise _Unreachable("reply larger than 1 MiB")
    except OSError as exc:  # includes TimeoutError, FileNotFoundError, ConnectionRefusedError
        raise _Unreachable(f"{path}: {exc}") from None
    try:
        reply = json.loads(buf.split(b"\n", 1)[0])
    except ValueError:
        raise _Unreachable(f"{path}: reply is not JSON: {buf[:200]!r}") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise _Unreachable(f"{path}: reply has no boolean 'ok': {reply!r}")
    return reply


def is_ambient(pod_labels: Mapping[str, str], ns_labels: Mapping[str, str]) -> bool:
    """The rule of Snapshot.is_ambient: the pod label decides, else the namespace label."""
    mode = pod_labels.get(DATAPLANE_MODE_LABEL)
    if mode in ("none", "ambient"):
        return mode == "ambient"
    return ns_labels.get(DATAPLANE_MODE_LABEL) == "ambient"


def pod_is_ambient(kubeconfig: str, namespace: str, name: str, timeout: float) -> bool:
    """Ask the API server whether the pod is in the mesh (same rule as Snapshot.is_ambient)."""
    pod_labels = _api_get(kubeconfig, f"/api/v1/namespaces/{namespace}/pods/{name}", timeout)
    if pod_labels.get(DATAPLANE_MODE_LABEL) in ("none", "ambient"):
        return is_ambient(pod_labels, {})
    ns_labels = _api_get(kubeconfig, f"/api/v1/namespaces/{namespace}", timeout)
    return is_ambient(pod_labels, ns_labels)


def pod_is_ambient_in_file(path: str, namespace: str, name: str) -> bool:
    """The same question asked of the YAML file ztunnel's file source reads (the lab). A pod
    the file does not hold yet is treated as its namespace says: the runtime creates the
    sandbox before whoever writes the file may have caught up."""
    import yaml

    pod_labels: dict[str, str] = {}
    ns_labels: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for doc in yaml.safe_load_all(f):
            if not isinstance(doc, dict):
                continue
            meta = doc.get("metadata") or {}
            labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
            if doc.get("kind") == "Namespace" and meta.get("name") == namespace:
                ns_labels = labels
            elif (
                doc.get("kind") == "Pod"
                and meta.get("name") == name
                and meta.get("namespace", "default") == namespace
            ):
                pod_labels = labels
    return is_ambient(pod_labels, ns_labels)


def _api_get(kubeconfig: str, path: str, timeout: float) -> Mapping[str, str]:
    """GET one object's labels with the kubeconfig's server, CA and token (stdlib only: the
    plugin runs once per pod and must start fast)."""
    import base64
    import ssl
    import tempfile
    import urllib.request

    with open(kubeconfig, encoding="utf-8") as f:
        text = f.read()
    try:  # the installer writes JSON (valid YAML), so the host needs nothing beyond stdlib
        kc = json.loads(text)
    except ValueError:
        import yaml  # a hand-written YAML kubeconfig, where PyYAML is at hand

        kc = yaml.safe_load(text)
    ctx_name = kc.get("current-context")
    contexts = {c["name"]: c["context"] for c in kc.get("contexts", [])}
    ctx = contexts.get(ctx_name) or next(iter(contexts.values()))
    cluster = {c["name"]: c["cluster"] for c in kc["clusters"]}[ctx["cluster"]]
    user = {u["name"]: u.get("user", {}) for u in kc.get("users", [])}.get(ctx.get("user"), {})
    headers = {"Accept": "application/json"}
    token = user.get("token")
    if not token and user.get("tokenFile"):
        with open(user["tokenFile"], encoding="utf-8") as f:
            token = f.read().strip()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    sslctx = None
    server = str(cluster["server"]).rstrip("/")
    if server.startswith("https://"):
        sslctx = ssl.create_default_context()
        if cluster.get("certificate-authority-data"):
            with tempfile.NamedTemporaryFile("wb", suffix=".crt") as ca:
                ca.write(base64.b64decode(cluster["certificate-authority-data"]))
                ca.flush()
                sslctx.load_verify_locations(ca.name)
        elif cluster.get("certificate-authority"):
            sslctx.load_verify_locations(cluster["certificate-authority"])
    req = urllib.request.Request(server + path, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout, context=sslctx) as resp:
        obj = json.loads(resp.read())
    labels = obj.get("metadata", {}).get("labels") or {}
    return {str(k): str(v) for k, v in labels.items()}


def run(inv: Invocation, log: _Log) -> dict[str, Any] | None:
    """Execute one invocation; the returned dict goes to stdout (None: print nothing)."""
    conf = inv.conf
    if inv.command == "VERSION":
        return {"cniVersion": inv.cni_version, "supportedVersions": list(SUPPORTED_VERSIONS)}
    prev = conf.get("prevResult")
    if inv.command in ("ADD", "CHECK") and not isinstance(prev, dict):
        raise CniError(
            ERR_INVALID_NETCONF,
            "no prevResult: ambientmesh-cni is a chained plugin and must follow an interface "
            "plugin in the conflist",
        )
    ns = inv.args.get("K8S_POD_NAMESPACE", "")
    name = inv.args.get("K8S_POD_NAME", "")
    sock = str(conf.get("enrolSocket") or DEFAULT_SOCKET)
    timeout = float(conf.get("timeoutSeconds") or 5)
    excluded = conf.get("excludeNamespaces")
    if excluded is None:
        excluded = list(DEFAULT_EXCLUDED)
    result = {**prev, "cniVersion": inv.cni_version} if isinstance(prev, dict) else None
    if inv.command == "CHECK":
        return None
    if not ns or not name:
        log(f"{inv.command} {inv.container_id}: not a Kubernetes pod (no K8S_POD_*), passing")
        return result if inv.command == "ADD" else None
    if ns in excluded:
        return result if inv.command == "ADD" else None
    cgroup_root = str(conf.get("cgroupRoot") or "/sys/fs/cgroup")
    cgroup = inv.args.get("AMBIENT_CGROUP") or (
        find_cgroup(inv.netns, cgroup_root) if inv.netns else None
    )
    request = {
        "op": "add" if inv.command == "ADD" else "del",
        "namespace": ns,
        "name": name,
        "netns": inv.netns,
        "cgroup": cgroup,
    }
    if inv.command == "DEL":
        try:
            reply = ask_ztunnel(sock, request, timeout)
            if not reply["ok"]:
                log(f"DEL {ns}/{name}: ztunnel: {reply.get('error')}")
        except _Unreachable as exc:
            log(f"DEL {ns}/{name}: ztunnel unreachable ({exc}); nothing to undo here")
        return None
    try:
        reply = ask_ztunnel(sock, request, timeout)
    except _Unreachable as exc:
        return _unreachable(inv, ns, name, result, str(exc), log)
    if not reply["ok"]:
        raise CniError(
            ERR_TRY_AGAIN_LATER if reply.get("busy") is True else ERR_ENROLMENT,
            f"pod {ns}/{name}: ztunnel could not enrol it: {reply.get('error', 'no reason')}",
            f"netns {inv.netns}, cgroup {cgroup}",
        )
    log(f"ADD {ns}/{name}: {'enrolled' if reply.get('enrolled', True) else 'not in the mesh'}")
    return result


def _unreachable(
    inv: Invocation, ns: str, name: str, result: dict[str, Any] | None, why: str, log: _Log
) -> dict[str, Any] | None:
    kubeconfig = inv.conf.get("kubeconfig")
    mesh_config = inv.conf.get("meshConfig")
    if not kubeconfig and not mesh_config:
        raise CniError(
            ERR_TRY_AGAIN_LATER,
            f"pod {ns}/{name}: ztunnel unreachable and no kubeconfig (or meshConfig) to tell "
            "whether the pod is in the mesh",
            why,
        )
    timeout = float(inv.conf.get("timeoutSeconds") or 5)
    source = "the API server" if kubeconfig else f"meshConfig {mesh_config}"
    try:
        if kubeconfig:
            ambient = pod_is_ambient(str(kubeconfig), ns, name, timeout)
        else:
            ambient = pod_is_ambient_in_file(str(mesh_config), ns, name)
    except Exception as exc:  # any failure to look: we cannot prove the pod is outside
        raise CniError(
            ERR_TRY_AGAIN_LATER,
            f"pod {ns}/{name}: ztunnel unreachable and the lookup in {source} failed",
            f"{why}; {type(exc).__name__}: {exc}",
        ) from None
    if ambient:
        raise CniError(
            ERR_TRY_AGAIN_LATER, f"pod {ns}/{name} is ambient but ztunnel is unreachable", why
        )
    log(
        f"ADD {ns}/{name}: ztunnel unreachable ({why}); {source} says the pod is not ambient, "
        "passing"
    )
    return result


def main(argv: list[str] | None = None) -> int:
    log = _Log(None)
    version = "1.0.0"
    try:
        inv = read_invocation(os.environ, sys.stdin)
        version = inv.cni_version
        log = _Log(inv.conf.get("logFile"))
        out = run(inv, log)
    except CniError as exc:
        err = {"cniVersion": version, "code": exc.code, "msg": exc.msg}
        if exc.details:
            err["details"] = exc.details
        log(f"error {exc.code}: {exc.msg} {exc.details}")
        sys.stdout.write(json.dumps(err) + "\n")
        return 1
    except Exception as exc:  # never a traceback in place of a CNI result
        msg = f"internal error: {exc!r}"
        log(msg)
        err = {"cniVersion": version, "code": ERR_IO, "msg": msg}
        sys.stdout.write(json.dumps(err) + "\n")
        return 1
    if out is not None:
        sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
