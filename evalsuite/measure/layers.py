"""Placeholder until the stage lands."""

from evalsuite.errors import EvalsuiteError
from evalsuite.measure import Stage


def run(ctx):
    raise EvalsuiteError("stage 'layers' is not available yet")


STAGE = Stage(name="layers", help="layers", run=run)
