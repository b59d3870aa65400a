"""Root conftest. `tests` is a package (every directory has an `__init__.py`), so pytest puts
the repository root on sys.path and every shared helper is imported one way, absolutely:
`from tests.meshkit import ...`, `from tests.fakes.kube_apiserver import ...`. A subprocess
that needs them gets PYTHONPATH=<repo root>, as it does for the code under test."""
