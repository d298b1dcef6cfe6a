"""The weckd error tree.

::

    WeckdError                 anything weckd reports to a user as one line
    ├── ConfigError            a config file, key or flag is wrong (CLI exit 2)
    ├── SiteDataError          a site's data is missing, unreadable or inconsistent (exit 1)
    ├── PayloadError           a relayed payload is malformed or of another version (exit 1)
    ├── SecurityError          a payload or peer failed verification (exit 1)
    └── LinkError              training or evaluating one link failed (exit 1)

Every message says what failed, where (file, key, site, link) and how to fix it. Only the CLIs
catch these and print them; anything else is a bug and keeps its traceback.
"""


class WeckdError(Exception):
    """Base of every error weckd reports to a user as one line."""

    exit_code = 1


class ReportedError(WeckdError):
    """The one-line error a child process reported (``weckd: error: …``), with the child's exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ConfigError(WeckdError):
    """A configuration file, key or command-line flag is invalid."""

    exit_code = 2


class SiteDataError(WeckdError):
    """A site's data is missing, unreadable or does not match the federation's classes."""


class PayloadError(WeckdError):
    """A relayed payload is malformed, of another format version or does not fit the model."""


class SecurityError(WeckdError):
    """A payload, key or peer failed verification."""


class LinkError(WeckdError):
    """Training or evaluating one link of the chain failed; ``failure`` is its label
    (``weckd.chain.protocol.Failure``), set where the failure is raised, never read back from the text."""

    failure = "other"

    def __init__(self, message: str = "", failure: str | None = None) -> None:
        super().__init__(message)
        if failure is not None:
            self.failure = str(getattr(failure, "value", failure))


def shown(value: object, limit: int = 200) -> str:
    """``repr(value)`` for an error message, at most ``limit`` characters: messages quote user content
    (a config value, a header field) and must stay one short line however large that content is.
    reprlib stops early, so a huge or deeply nested value is never rendered whole."""
    import reprlib  # only on the error path

    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother, short.maxlong = 3, limit, limit, limit
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = 8
    text = short.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
