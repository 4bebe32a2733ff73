"""The exceptions fedfm raises.

Every error derives from :class:`FedfmError`; each subclass also derives from the
built-in exception it resembles, so ``except ValueError`` keeps working for
callers that do not know fedfm.
"""

from __future__ import annotations


class FedfmError(Exception):
    """Base class of every error raised by fedfm."""


class ConfigError(FedfmError, ValueError):
    """A run configuration is invalid.

    Parameters
    ----------
    problems : list[str]
        One message per invalid field, each naming the field, the value it got
        and what is allowed. All problems are reported at once.
    """

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid fedfm configuration ({len(self.problems)} problem(s)):\n{lines}")


class DataError(FedfmError, ValueError):
    """A dataset is missing, unreadable, or does not have the expected shape."""


class ModelError(FedfmError, RuntimeError):
    """A base model cannot be found or loaded."""


class AdapterError(FedfmError, ValueError):
    """An adapter state has the wrong keys, shapes or values."""


class CheckpointError(FedfmError, ValueError):
    """A run's checkpoint is missing, corrupt (checksum), or does not fit the run that resumes it."""


class RunDirectoryError(FedfmError, OSError):
    """A run directory cannot be used: a file, unwritable, in use by another process, or holding a run already."""


class ReportError(FedfmError, ValueError):
    """A run directory lacks what a report needs, or a report file cannot be written."""


class MissingExtraError(FedfmError, ImportError):
    """An optional dependency is not installed.

    Parameters
    ----------
    package : str
        The missing import.
    extra : str
        The fedfm extra that installs it.
    """

    def __init__(self, package: str, extra: str) -> None:
        self.package = package
        self.extra = extra
        super().__init__(
            f"`{package}` is not installed; install it with: pip install \"fedfm[{extra}]\""
        )
