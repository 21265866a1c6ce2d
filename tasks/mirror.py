"""The functions the task YAMLs in this folder name (``!function mirror.xxx``; lm-eval loads this
file by its path, so ``tasks`` need not be an importable package). ``load`` reads a task's rows from
the local mirror or the Hub: it is ``evalsuite.data.mirror.load`` (the mirror's one module); the rest
are the small per-task functions. A task folder of your own (``--tasks-dir``) can copy this file.
"""

from __future__ import annotations

from evalsuite.data.mirror import DataError, load  # noqa: F401  (custom_dataset: !function mirror.load)


def partial_gold(doc: dict) -> int:
    """Winogrande's gold index; lm-eval reads an int from doc_to_text as "score each context"."""
    return doc["gold"]


def partial_continuation(doc: dict) -> str:
    return doc["continuation"]


def partial_contexts(doc: dict) -> list[str]:
    return doc["context_options"]


def wikitext_page(doc: dict) -> str:
    """The article with WikiText's tokenization undone (lm-eval's detokenizer)."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    return wikitext_detokenizer(doc)


def wikitext_results(doc: dict, results: list) -> dict[str, tuple[float, int]]:
    """(log-likelihood, count) pairs for word and byte perplexity and bits per byte, as lm-eval's."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import process_results

    return process_results(doc, results)
