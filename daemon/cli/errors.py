"""The one error type of the CLI."""


class UserError(Exception):
    """A mistake the user can fix; printed as one line, exit code 2."""
