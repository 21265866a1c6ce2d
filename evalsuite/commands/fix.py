"""``evalsuite fix RESULTS.json`` (and ``run --suggest-fix``'s options): parsed here; the fix itself is
``evalsuite.app.fix``."""

from __future__ import annotations

import argparse

from evalsuite.app.fix import DEFAULT_BUDGET, SEARCHES
from evalsuite.results import Results


def add_fix_options(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--fix-budget", default=DEFAULT_BUDGET,
                   help="most extra weight bytes the recipe may add: a share of the bytes from the scheme to fp "
                        "(a percentage or fraction; default 25%%: a quarter of the way), or an effective "
                        "bits-per-weight ceiling such as 5.5bpw")
    g.add_argument("--fix-granularity", choices=["layer", "block"], default="layer",
                   help="accepted for older scripts; the recipe search chooses a format per linear layer")
    g.add_argument("--fix-tokens", type=int, default=4096, help="calibration tokens (default 4096)")
    g.add_argument("--fix-corpus",
                   help="calibration corpus, disjoint from --ppl-corpus (default: the other WikiText-2 split; "
                        "wikitext2, wikitext2-valid or a .txt/.jsonl file)")
    g.add_argument("--fix-margin", type=float, default=0.8,
                   help="predicted KLD and ln(ppl ratio) must be below this fraction of their limits (default 0.8)")
    g.add_argument("--fix-rerank", type=int, default=8,
                   help="most moves (a layer to a larger format) re-measured on top of the current recipe at each "
                        "greedy round (default 8)")
    g.add_argument("--fix-search", choices=SEARCHES, default=SEARCHES[0],
                   help="path (default): estimate every layer's KLD in every format from one forward and backward "
                        "of fp (diagonal Fisher), then measure the shortest prefix of the estimated greedy path "
                        "that meets the target (a bisection, ~log2(moves) forwards); greedy: the same estimates, "
                        "then every move re-measured on top of the current recipe (~10x the forwards, a somewhat "
                        "smaller recipe)")
    g.add_argument("--fix-verify-strategies", action="store_true",
                   help="verify the frontier's simple strategies on the evaluation data too (default: predicted on "
                        "the calibration tokens only; the chosen recipe is always verified)")


def fix_config(args: argparse.Namespace, suggest: bool):
    """The run's ``FixConfig`` from the parsed fix options (``run --suggest-fix`` and ``evalsuite fix``)."""
    from evalsuite.app.config import FixConfig

    return FixConfig(suggest=suggest, budget=args.fix_budget, granularity=args.fix_granularity,
                     tokens=args.fix_tokens, corpus=args.fix_corpus, margin=args.fix_margin, rerank=args.fix_rerank,
                     verify_strategies=args.fix_verify_strategies, search=args.fix_search)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", help="results.json of a run (its model, schemes and data are reused)")
    add_fix_options(p.add_argument_group("fix"))
    p.add_argument("--gates", metavar="FILE", help="YAML file overriding the default gate limits (default: the run's --gates)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], help="default: the run's device")
    p.add_argument("--model", help="the model, where it moved since the run (default: the run's model path)")
    p.add_argument("--data-dir", help="evaluation data (default: the run's --data-dir)")
    p.add_argument("--threads", type=int, help="CPU threads for torch")


def main(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    from evalsuite.app.session import fix_results
    from evalsuite.commands.cli import build_parser
    from evalsuite.commands.run import config_from_args

    results = Results.load(args.results)
    argv = results.run.get("argv") or []
    run_args = build_parser("run").parse_args(argv if argv[:1] == ["run"] else ["run"])
    # the run's own config, with this command's fix options
    config = dataclasses.replace(config_from_args(run_args, argv), fix=fix_config(args, suggest=True))
    return fix_results(config, results, Path(args.results), gates=args.gates, device=args.device, model=args.model,
                       data_dir=args.data_dir, threads=args.threads)
