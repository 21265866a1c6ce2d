"""One tokenization rule for every stage: BOS first where the tokenizer adds it by itself.

lm-eval's ``HFLM`` (0.4.13, ``add_bos_token`` unset) encodes a context with the tokenizer's default,
``tokenizer.encode(text)``: a Llama or Gemma tokenizer prepends BOS there, a GPT-2, SmolLM2 or Qwen2
one does not; a text that already starts with the BOS string gets nothing added. The ppl, tasks,
layers and generation stages all follow that rule, so the numbers of one stage describe the input the
others see and the task scores are lm-eval's. The rule is recorded in results.json as
``run.tokenization``.

Only BOS is taken from the tokenizer's special tokens: one that also appends EOS (rare for causal
LMs) gets no EOS from us, where HFLM's context would end in it and its continuation lose a token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

PROBE = "Hello world"


@dataclass(frozen=True)
class TokenizationRule:
    """``bos_id``: the token put first (None: nothing added); ``bos_text`` its string, so that a text
    already starting with it gets no second one (as HFLM's ``has_bos_prefix``)."""

    bos_id: int | None
    bos_text: str | None
    rule: str

    @property
    def bos(self) -> bool:
        return self.bos_id is not None

    def prefix(self, ids: list[int], text: str | None = None) -> list[int]:
        """``ids`` (a text encoded without special tokens) as the rule encodes the text."""
        if self.bos_id is None or (text is not None and self.bos_text and text.startswith(self.bos_text)):
            return list(ids)
        return [self.bos_id, *ids]

    def record(self) -> dict[str, Any]:
        return {"bos": self.bos, "bos_id": self.bos_id, "rule": self.rule}


def bos_rule(tokenizer: Any) -> TokenizationRule:
    """The rule for ``tokenizer``, read from what its default encoding adds to a probe string."""
    none = TokenizationRule(None, None, "no BOS: the tokenizer adds none by default (as lm-eval's HFLM)")
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return none
    default = list(tokenizer(PROBE)["input_ids"])
    raw = list(tokenizer(PROBE, add_special_tokens=False)["input_ids"])
    if not default or default[0] != bos or default == raw:
        return none
    extra = "" if default == [bos, *raw] else (
        "; the tokenizer's other default special tokens are not added")
    text = getattr(tokenizer, "bos_token", None)
    return TokenizationRule(int(bos), text if isinstance(text, str) and text else None,
                            f"BOS first: the tokenizer adds it by default (as lm-eval's HFLM){extra}")


def encode_many(tokenizer: Any, texts: Iterable[str], rule: TokenizationRule | None = None) -> list[list[int]]:
    """Each text's token ids under the rule (one batched tokenizer call)."""
    texts = list(texts)
    rule = rule or bos_rule(tokenizer)
    raw = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return [rule.prefix(ids, t) for ids, t in zip(raw, texts)]


def encode(tokenizer: Any, text: str, rule: TokenizationRule | None = None) -> list[int]:
    """``text``'s token ids under the rule."""
    return encode_many(tokenizer, [text], rule)[0]


def note(run: dict, rule: TokenizationRule) -> None:
    """Record the rule in the run's metadata (``results.run``); every stage records the same one."""
    run["tokenization"] = rule.record()
