"""User-facing errors.

Anything a user can fix (a missing file, a bad config value, a malformed record that stops a run)
raises :class:`LmstackError`. The CLI prints it as one line -- ``lmstack: <message>`` -- and exits 2;
``--debug`` shows the traceback. Library callers catch it like any exception.
"""

from __future__ import annotations


class LmstackError(Exception):
    """An error the user can act on. The message says what was wrong, where, and what to do."""

    exit_code = 2


class ConfigError(LmstackError):
    """A config file or override is invalid (names the field and the allowed values)."""


class DataError(LmstackError):
    """Input data cannot be used (names the file, and the line where there is one)."""


class CheckpointError(LmstackError):
    """A model or checkpoint directory is missing, incomplete, corrupt or inconsistent."""


class Interrupted(LmstackError):
    """The user stopped a run (Ctrl-C = SIGINT, or SIGTERM). The message says what was kept and how to resume;
    the exit status is the shell's convention, 128 + the signal number (130 / 143)."""

    def __init__(self, message: str, signum: int = 2):
        super().__init__(message)
        self.exit_code = 128 + int(signum)



class Terminated(BaseException):
    """SIGTERM under the ``lmstack`` command, raised where the program is (like Ctrl-C's KeyboardInterrupt) so
    ``finally`` blocks, pool shutdowns and atomic writes clean up; the CLI then exits 143. A BaseException,
    like KeyboardInterrupt, so ``except Exception`` does not swallow it (and not a KeyboardInterrupt, which
    typer turns into a silent exit status 130). Catch ``(KeyboardInterrupt, Terminated)`` to handle both."""
