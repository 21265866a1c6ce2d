"""What a run measured and how: the protocol two runs must share for their metrics to compare.

``compare`` and ``gate`` warn, in one line, when two runs' protocols differ (a +42% perplexity
between 2048- and 256-token windows is the protocol, not the model). The protocol is read from the
records themselves (each ppl record names its windows, each speed record its settings), so a
stored baseline, which keeps only records, carries it too.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

from evalsuite.results import Metric, Results

_PPL_RULE = re.compile(r"^(?:.*?: )?(?P<rule>.*?), \d+ windows")


def protocol_of(records: Iterable[Metric], run: dict[str, Any] | None = None, *, limit: Any = None,
                dtype: str | None = None, device: str | None = None) -> dict[str, str]:
    """The protocol as ``{aspect: description}``: ppl windows, speed settings, sample limit, suite,
    dtype, device. ``run`` (a results file's run section) supplies the run-level aspects; a
    baseline passes them as keywords."""
    out: dict[str, str] = {}
    for m in records:
        protocol = (m.extra or {}).get("protocol")
        if m.stage == "ppl" and isinstance(protocol, str) and "ppl" not in out:
            match = _PPL_RULE.match(protocol)
            out["ppl"] = match.group("rule") if match else protocol
        if m.stage == "speed" and m.metric == "tokens_per_s" and f"speed {m.task}" not in out and m.extra:
            e = m.extra
            what = [f"{e['n_tokens']} tokens" if "n_tokens" in e else None,
                    f"prompt {e['prompt_len']}" if "prompt_len" in e else None,
                    "compiled" if e.get("compiled") else "eager" if "compiled" in e else None]
            if any(what):
                out[f"speed {m.task}"] = ", ".join(w for w in what if w)
    if run is not None:
        limit, dtype = run.get("limit"), run.get("dtype")
        device = (run.get("device") or {}).get("type")
        out["suite"] = str(run.get("suite") or "full data")
    out["limit"] = "none" if limit is None else str(limit)
    if dtype:
        out["dtype"] = str(dtype)
    if device:
        out["device"] = str(device)
    return out


def results_protocol(results: Results) -> dict[str, str]:
    return protocol_of(results.records, results.run)


def baseline_protocol(baseline) -> dict[str, str]:
    return protocol_of(baseline.metrics, limit=baseline.limit, dtype=baseline.dtype, device=baseline.device_type)


def differences(a: dict[str, str], b: dict[str, str]) -> list[str]:
    """``aspect: A vs B`` for each aspect both sides state and state differently."""
    return [f"{k}: {a[k]} vs {b[k]}" for k in a if k in b and a[k] != b[k]]


def mismatch_warning(a: dict[str, str], b: dict[str, str], what: str = "the two runs") -> str | None:
    """One line naming every difference, or None when the protocols agree."""
    diffs = differences(a, b)
    if not diffs:
        return None
    return f"warning: {what} were measured differently ({'; '.join(diffs)}); their metrics are not like for like"
