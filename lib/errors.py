"""UserError: a mistake the user can fix. Its own module, without torch, so that the data scripts can raise it too."""


class UserError(Exception):
    """A mistake the user can fix: printed as one line saying what to do, exit code 1, no traceback."""
