"""One target under atheris (libFuzzer), in a process of its own: `python -m
benchmarks.fuzz.one TARGET -- LIBFUZZER_ARGS...`. The runner (`python -m benchmarks.fuzz`)
starts one per target and reads libFuzzer's final statistics from its stderr.

The modules the target drives are imported under atheris' instrumentation, so the fuzzer is
guided by coverage of our parsers and of h2/hpack/httptools' Python parts."""

from __future__ import annotations

import sys

import atheris

INSTRUMENT = ["mesh", "waypoint", "ztunnel", "h2", "hpack", "yaml"]


def main() -> None:
    name = sys.argv[1]
    with atheris.instrument_imports(include=INSTRUMENT):
        import cni.plugin  # noqa: F401
        import mesh.config.parse
        import mesh.hbone  # noqa: F401
        import waypoint.h1
        import waypoint.h2  # noqa: F401
    from benchmarks.fuzz.targets import TARGETS

    target = TARGETS[name]()
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
