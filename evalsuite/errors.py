"""The one exception type for errors a user can cause.

The CLI turns it into a single line on stderr and exit code 2, with no traceback.
"""


class EvalsuiteError(Exception):
    """Bad path, bad file, unknown name, empty data: anything the user can fix."""
