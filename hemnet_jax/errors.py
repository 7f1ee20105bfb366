"""The base class of expected errors: a user's mistake that one `FATAL:` line explains.

Every program's main runs under `cli.run`, which prints such an error as `FATAL: <message>` and
exits with code 1 (no traceback; `HEMNET_DEBUG=1` shows it). Any other exception is a bug and
keeps its traceback. Library errors a user can cause subclass `UserError` as well as the builtin
type callers already catch (e.g. `class MissingDataError(FileNotFoundError, UserError)`).
This module imports nothing so that every layer of the package may subclass it.
"""


class UserError(Exception):
    """An expected error: its message names the cause, the file or key, and what to do."""
