"""Error types the CLI turns into exit codes.

Stage modules raise these; ``cli.py`` prints one line and exits, so no stage knows about Typer.
"""


class UserError(Exception):
    """Bad usage or bad input (exit code 2). The message names the file or key and the fix."""


class StageError(Exception):
    """A failure while working on valid input (exit code 1)."""
