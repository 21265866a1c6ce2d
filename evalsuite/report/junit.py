"""JUnit XML, the one writer: a run's checks (one test case per check, so any CI shows the gates
natively) and the nightly matrix's entries go through ``junit_xml``.

A run: FAIL (and IMPROVED or INVALID when failing) → ``<failure>``; INCOMPLETE (no verdict) →
``<error>``; SKIPPED → ``<skipped>``; the reason is the message.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from evalsuite.results import Results, write_text_atomic

OUTCOMES = ("pass", "failure", "error", "skipped")


@dataclass(frozen=True)
class Case:
    """One test case: ``outcome`` one of OUTCOMES; ``text`` the element's body (a log, a command)."""

    classname: str
    name: str
    outcome: str
    message: str
    text: str = ""
    type: str | None = None
    time: float | None = None


def junit_xml(suite_name: str, cases: list[Case]) -> str:
    """``<testsuites>`` holding one ``<testsuite>`` of ``cases``, its counts from the cases."""
    count = {o: sum(c.outcome == o for c in cases) for o in OUTCOMES}
    suite = ET.Element("testsuite", name=suite_name, tests=str(len(cases)), failures=str(count["failure"]),
                       errors=str(count["error"]), skipped=str(count["skipped"]))
    for c in cases:
        case = ET.SubElement(suite, "testcase", classname=c.classname, name=c.name)
        if c.time is not None:
            case.set("time", f"{c.time:g}")
        if c.outcome == "pass":
            ET.SubElement(case, "system-out").text = c.message
            continue
        element = ET.SubElement(case, c.outcome, message=c.message)
        if c.type:
            element.set("type", c.type)
        if c.text:
            element.text = c.text
    root = ET.Element("testsuites")
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _verdict_case(v: dict) -> Case:
    message = f"{v['verdict']}: {v.get('reason', '')}"
    classname = f"evalsuite.{v.get('kind', 'check')}.{v.get('stage') or 'run'}"
    if v.get("failing"):
        return Case(classname, v["check"], "failure", message, type=v["verdict"],
                    text=message + (f"\n{v['command']}" if v.get("command") else ""))
    if v.get("verdict") == "INCOMPLETE":
        return Case(classname, v["check"], "error", message, type="INCOMPLETE")
    if v.get("verdict") == "SKIPPED":
        return Case(classname, v["check"], "skipped", message)
    return Case(classname, v["check"], "pass", message)


def render_junit(results: Results) -> str:
    model = (results.run.get("model") or {}).get("name", "model")
    return junit_xml(f"evalsuite.{model}", [_verdict_case(v) for v in results.verdicts])


def write_junit(results: Results, path: Path) -> Path:
    return write_text_atomic(path, render_junit(results))
