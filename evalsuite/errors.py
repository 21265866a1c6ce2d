"""The one exception type for errors a user can cause.

The CLI turns it into a single line on stderr and exit code 2, with no traceback.
"""


class EvalsuiteError(Exception):
    """Bad path, bad file, unknown name, empty data: anything the user can fix."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """The gist of an exception in one line, for a one-line error message. Libraries' messages can
    be empty (then the type's name) or put the gist on the second line after a "...:" header (torch's
    state-dict errors), which is then joined on."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    text = lines[0] if len(lines) == 1 or not lines[0].endswith(":") else f"{lines[0]} {lines[1]}"
    return text[:limit]
