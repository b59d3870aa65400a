"""The operator-error type, in its own module so that it is one class however meshctl is
started (`meshctl`, `python -m meshctl`, `python -m meshctl.cli`)."""


class UsageError(Exception):
    """Bad input from the operator: printed as one line, exit status 2."""
