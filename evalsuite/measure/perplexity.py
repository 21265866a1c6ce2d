"""Placeholder until the stage lands."""

from evalsuite.errors import EvalsuiteError
from evalsuite.measure import Stage


def run(ctx):
    raise EvalsuiteError("stage 'perplexity' is not available yet")


STAGE = Stage(name="perplexity", help="perplexity", run=run)
