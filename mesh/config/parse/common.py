"""What every kind's parser shares: the per-object error collector, metadata checks, the
Kubernetes name/label/header grammars and Gateway API durations, and `ConfigErrors`, the
one exception a load raises."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from mesh.config.model import (
    ConfigError,
)


class ConfigErrors(ConfigError):
    """Every problem found in one load. `errors` holds each `ConfigError`; the message lists
    them one per line so a CLI can print it as is."""

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        self.errors: tuple[ConfigError, ...] = tuple(errors)
        first = self.errors[0] if self.errors else ConfigError("config", "", "invalid")
        super().__init__(first.obj, first.field_path, first.problem)
        self.args = ("\n".join(str(e) for e in self.errors),)

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$")
_DURATION = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")
_DURATION_PART = re.compile(r"([0-9]{1,5})(h|ms|m|s)")
_METHODS = frozenset(
    ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"]
)
_REDIRECT_CODES = frozenset([301, 302, 303, 307, 308])


def parse_duration(text: str) -> float:
    """A Gateway API duration ("10s", "500ms", "1h2m") in seconds; ValueError if malformed."""
    if not isinstance(text, str) or not _DURATION.match(text):
        raise ValueError(f"invalid duration {text!r} (want e.g. 10s, 500ms, 1h2m)")
    unit = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(int(n) * unit[u] for n, u in _DURATION_PART.findall(text))


class _Ctx:
    """Error collection for one object: `err(field, problem)` records and carries on."""

    def __init__(self, obj: str, errors: list[ConfigError]) -> None:
        self.obj = obj
        self.errors = errors

    def err(self, path: str, problem: str) -> None:
        self.errors.append(ConfigError(self.obj, path, problem))

    # Typed accessors: a wrong type is an error and returns the fallback.
    def mapping(self, v: Any, path: str) -> Mapping[str, Any]:
        if v is None:
            return {}
        if not isinstance(v, Mapping):
            self.err(path, "must be a mapping")
            return {}
        return v

    def seq(self, v: Any, path: str) -> list[Any]:
        if v is None:
            return []
        if not isinstance(v, list):
            self.err(path, "must be a list")
            return []
        return v

    def string(self, v: Any, path: str, default: str | None = None) -> str | None:
        if v is None:
            return default
        if not isinstance(v, str):
            self.err(path, "must be a string")
            return default
        return v

    def strings(self, v: Any, path: str) -> tuple[str, ...]:
        out = []
        for i, s in enumerate(self.seq(v, path)):
            x = self.string(s, f"{path}[{i}]")
            if x is not None:
                out.append(x)
        return tuple(out)

    def port(self, v: Any, path: str) -> int | None:
        if isinstance(v, bool) or not isinstance(v, int):
            self.err(path, "must be an integer port")
            return None
        if not 1 <= v <= 65535:
            self.err(path, "must be between 1 and 65535")
            return None
        return v

    def ipv4(self, v: Any, path: str) -> str | None:
        s = self.string(v, path)
        if s is None:
            return None
        try:
            ipaddress.IPv4Address(s)
        except ValueError:
            self.err(path, f"{s!r} is not an IPv4 address")
            return None
        return s

    def dns_label(self, v: Any, path: str) -> str | None:
        s = self.string(v, path)
        if s is None:
            self.err(path, "is required")
            return None
        if len(s) > 63 or not _DNS1123_LABEL.match(s):
            self.err(path, f"{s!r} is not a valid DNS-1123 label")
            return None
        return s

    def labels(self, v: Any, path: str) -> Mapping[str, str]:
        out: dict[str, str] = {}
        for k, val in self.mapping(v, path).items():
            key = str(k)
            name = key.rsplit("/", 1)[-1]
            prefix = key[: -len(name) - 1] if "/" in key else ""
            if not name or len(name) > 63 or not _LABEL_NAME.match(name):
                self.err(f"{path}.{key}", "is not a valid label name")
                continue
            if prefix and not _DNS1123_SUBDOMAIN.match(prefix):
                self.err(f"{path}.{key}", "has an invalid label prefix")
                continue
            if isinstance(val, bool) or val is None:
                self.err(f"{path}.{key}", "must be a string")
                continue
            sval = str(val)
            if len(sval) > 63 or not _LABEL_VALUE.match(sval):
                self.err(f"{path}.{key}", f"{sval!r} is not a valid label value")
                continue
            out[key] = sval
        return MappingProxyType(dict(sorted(out.items())))


def _meta(
    doc: Mapping[str, Any], kind: str, errors: list[ConfigError], namespaced: bool
) -> tuple[_Ctx, str, str, Mapping[str, Any]] | None:
    meta = doc.get("metadata")
    if not isinstance(meta, Mapping):
        errors.append(ConfigError(kind, "metadata", "must be a mapping"))
        return None
    name = meta.get("name")
    ns = meta.get("namespace", "default") if namespaced else ""
    if not isinstance(ns, str):
        ns = str(ns)
    label = f"{kind} {ns}/{name}" if namespaced else f"{kind} {name}"
    ctx = _Ctx(label, errors)
    if not isinstance(name, str) or not name:
        ctx.err("metadata.name", "is required")
        return None
    if len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name):
        ctx.err("metadata.name", f"{name!r} is not a valid DNS-1123 name")
    if namespaced and (len(ns) > 63 or not _DNS1123_LABEL.match(ns)):
        ctx.err("metadata.namespace", f"{ns!r} is not a valid DNS-1123 label")
    return ctx, ns, name, meta
