"""Root conftest: its directory goes on sys.path, so every test module can import the shared
helpers in `meshkit` (test directories have no `__init__.py`)."""
