"""The grammar of one ``--quant`` entry: ``[NAME=]TARGET[:ATTR][(k=v, ...)][+head]``.

Keyword values are Python literals read with ``ast.literal_eval``: the spec is never evaluated, so
``f(x=open('/etc/passwd'))`` is refused, not run. Variant names are filesystem-safe (they become
baseline file names) and carry no ``@`` (that marks derived variants such as ``fp@noise``).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Any

from evalsuite.errors import EvalsuiteError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}")
_NAMED = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.+-]*)=(.+)", re.DOTALL)
_REF = re.compile(r"(?P<source>.+?):(?P<attr>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(?P<call>\(.*\))?", re.DOTALL)
_MODULE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
RESERVED = ("fp",)


@dataclass(frozen=True)
class Reference:
    """``source:attr(kwargs)`` with the source a ``.py`` file, a dotted module, or ``torchao``."""

    text: str          # the spec as written, without NAME= (for messages and the results file)
    source: str
    attr: str
    kwargs: tuple[tuple[str, Any], ...]
    include_head: bool

    @property
    def is_file(self) -> bool:
        return self.source.endswith(".py")

    def default_name(self) -> str:
        """``dir/my_quant.py:Int4(groupsize=64)`` → ``my_quant.Int4-groupsize64``."""
        if self.is_file:
            stem = re.split(r"[\\/]", self.source)[-1][: -len(".py")]
        else:
            stem = self.source.rsplit(".", 1)[-1]
        parts = [f"{stem}.{self.attr}"] + [f"{k}{v!r}" for k, v in self.kwargs]
        name = slug("-".join(parts)) + ("+head" if self.include_head else "")
        return name[:100]


@dataclass(frozen=True)
class ReferencedScheme:
    """A scheme the user named by reference (a handler or a torchao config): its variant name is
    the label, its spec the reference as written."""

    ref: Reference
    label: str

    @property
    def name(self) -> str:
        return self.label

    @property
    def spec(self) -> str:
        return self.ref.text


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "", text.replace(" ", "")).strip(".-") or "variant"


def split_top_level(spec: str) -> list[str]:
    """Split on commas that are not inside brackets or quotes: ``a,f(x=1, y=2)`` → 2 entries."""
    out, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(spec):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(spec[start:i])
            start = i + 1
    out.append(spec[start:])
    return [s.strip() for s in out if s.strip()]


def split_name(entry: str) -> tuple[str | None, str]:
    """``NAME=SPEC`` → (NAME, SPEC); a spec without a leading name → (None, spec)."""
    m = _NAMED.fullmatch(entry)
    if not m:
        return None, entry
    return check_name(m.group(1), entry), m.group(2).strip()


def check_name(name: str, where: str) -> str:
    if not NAME_RE.fullmatch(name) or name in RESERVED:
        raise EvalsuiteError(f"{where!r}: variant name {name!r} must be letters, digits and _ . + - "
                             f"(at most 100, not 'fp')")
    return name


def parse_kwargs(call: str | None, where: str) -> tuple[tuple[str, Any], ...]:
    """``(group_size=128, sym=True)`` → (("group_size", 128), ("sym", True)); literals only."""
    if not call:
        return ()
    try:
        tree = ast.parse("f" + call, mode="eval").body
    except SyntaxError:
        raise EvalsuiteError(f"{where!r}: cannot parse the arguments {call!r} (expected (name=literal, ...))") from None
    if not isinstance(tree, ast.Call) or tree.args:
        raise EvalsuiteError(f"{where!r}: arguments must be keywords, e.g. (group_size=128)")
    out = []
    for kw in tree.keywords:
        if kw.arg is None:
            raise EvalsuiteError(f"{where!r}: ** arguments are not accepted; name each keyword")
        try:
            out.append((kw.arg, ast.literal_eval(kw.value)))
        except (ValueError, SyntaxError, TypeError):
            raise EvalsuiteError(f"{where!r}: the value of {kw.arg!r} is not a Python literal "
                                 f"(numbers, strings, True/False/None, tuples, lists, dicts)") from None
    return tuple(out)


def parse_reference(text: str) -> Reference | None:
    """The reference form of a spec, or None when ``text`` is not one (then it is a built-in name)."""
    head = text.endswith("+head")
    body = text[: -len("+head")] if head else text
    m = _REF.fullmatch(body)
    if not m:
        if ":" in body:
            raise EvalsuiteError(f"{text!r}: expected FILE.py:NAME, package.module:NAME or torchao:CONFIG, "
                                 f"optionally with (keyword=literal, ...)")
        return None
    source = m.group("source")
    if not source.endswith(".py") and not _MODULE.fullmatch(source):
        raise EvalsuiteError(f"{text!r}: {source!r} is neither a .py file nor a dotted module name")
    return Reference(text=text, source=source, attr=m.group("attr"), kwargs=parse_kwargs(m.group("call"), text),
                     include_head=head)
