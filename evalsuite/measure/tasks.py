"""Placeholder until the stage lands."""

from evalsuite.errors import EvalsuiteError
from evalsuite.measure import Stage


def run(ctx):
    raise EvalsuiteError("stage 'tasks' is not available yet")


STAGE = Stage(name="tasks", help="tasks", run=run)
