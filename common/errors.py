"""ptqflow's own errors, and how any exception's message is cut to one line. Anything a user can cause by bad input
is a PtqflowError: the CLI prints its message as one line and exits non-zero, without a traceback."""


def first_line(exc_or_text: BaseException | str, limit: int | None = None) -> str:
    """The first non-empty line of a message, cut to `limit` characters: an exception's (str(exc); for an
    MlflowException that is its `.message`), or its type name when it has no message; a text's, or "" when empty."""
    text = str(exc_or_text).strip()
    if text:
        line = text.splitlines()[0]
    else:
        line = "" if isinstance(exc_or_text, str) else type(exc_or_text).__name__
    return line if limit is None else line[:limit]


def failure_reason(exc: BaseException) -> str:
    """Why something failed, in one line: the exception's type and the first line of its message."""
    return f"{type(exc).__name__}: {first_line(str(exc))}"


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
