"""Placeholder until the stage lands."""

from evalsuite.errors import EvalsuiteError
from evalsuite.measure import Stage


def run(ctx):
    raise EvalsuiteError("stage 'speed' is not available yet")


STAGE = Stage(name="speed", help="speed", run=run)
