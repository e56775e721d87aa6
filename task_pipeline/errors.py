"""The errors a user can cause, each carrying its exit code (SPEC section 6).

Anything raised from here is printed by the CLI as one line; anything else is a
bug and gets a traceback.
"""


class UserError(Exception):
    """Something the user can fix; printed as one line."""

    exit_code = 2


class UsageError(UserError):
    exit_code = 2


class ManifestError(UserError):
    """A manifest problem, located as precisely as we can: file, step, key."""

    exit_code = 2

    def __init__(self, message: str, *, file: str = "", step: str | None = None, key: str | None = None):
        self.file, self.step, self.key = file, step, key
        where = file or "manifest"
        if step is not None:
            where += f": step '{step}'"
        if key is not None:
            where += f": key '{key}'"
        super().__init__(f"{where}: {message}")


class StoreError(UserError):
    """The store or database cannot be used as it is (corrupt, newer schema, unreadable, disk full)."""

    exit_code = 3


class DatabaseUnavailable(StoreError):
    """The database cannot be reached (server down, network cut, connection lost).
    `run` stops (exit 3); `serve` waits and tries again."""
