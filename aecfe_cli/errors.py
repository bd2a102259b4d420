"""Error types the CLI turns into exit codes.

Stage modules raise these; ``cli.py`` prints one line and exits, so no stage knows about Typer.
"""


class UserError(Exception):
    """Bad usage or bad input (exit code 2). The message names the file or key and the fix."""


class StageError(Exception):
    """A failure while working on valid input (exit code 1)."""


def did_you_mean(name: str, choices) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or nothing when none is close."""
    import difflib

    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.4)
    return f" (did you mean '{close[0]}'?)" if close else ""


def check_choice(key: str, value, choices) -> None:
    """Fail with one line naming the setting ``key`` unless ``value`` is one of ``choices``, with a did-you-mean
    hint for a misspelt name (a number has none: 48 is no misspelt 64)."""
    if value not in choices:
        hint = did_you_mean(value, choices) if isinstance(value, str) else ""
        raise UserError(f"{key} '{value}'{hint}: choose one of {', '.join(map(str, choices))}")
