"""The one exception type magdiff raises for bad user input."""

from __future__ import annotations


class MagDiffInputError(ValueError):
    """Raised for invalid user input (missing or corrupt files, wrong sizes, empty masks, unknown options).

    The message always says what was wrong and what to do about it. The CLI prints it as a single line and exits
    with status 2; nothing is written to the output path when it is raised.
    """


class PromptTruncatedWarning(UserWarning):
    """Issued when a prompt longer than the text encoder's context is cut because truncation was asked for; the
    message says what was kept."""
