"""The one exception type a user ever sees: a clear one-line message, no traceback."""


class FedLoraError(Exception):
    """Bad input or an unmeetable request; the CLI prints it on one line and exits 2."""
