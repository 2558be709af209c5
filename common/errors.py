"""ptqflow's own errors. Anything a user can cause by bad input is a PtqflowError: the CLI prints its
message as one line and exits non-zero, without a traceback."""


def failure_reason(exc: BaseException) -> str:
    """Why something failed, in one line: the exception's type and the first line of its message."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


class PtqflowError(Exception):
    """Base class: a problem the user can fix; the message says what is wrong and what to do."""

    exit_code = 2


class DataError(PtqflowError):
    """The dataset is missing, malformed or unsafe."""


class ModelError(PtqflowError):
    """The model file is missing, not ONNX, or has an unsupported input."""


class ConfigError(PtqflowError):
    """An option or option combination is invalid."""


class TrackingError(PtqflowError):
    """The tracking server or registry refused or failed a request."""


class IntegrityError(PtqflowError):
    """A downloaded or registered file does not match its recorded digest."""


class FetchError(PtqflowError):
    """A download or archive extraction failed."""
