"""JUnit XML: one test case per check, so any CI shows the gates natively.

FAIL (and IMPROVED when failing) → ``<failure>``; INCOMPLETE (no verdict) → ``<error>``; SKIPPED →
``<skipped>``; the reason is the message.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from evalsuite.results import Results, write_text_atomic


def render_junit(results: Results) -> str:
    verdicts = results.verdicts
    model = (results.run.get("model") or {}).get("name", "model")
    suite = ET.Element("testsuite", name=f"evalsuite.{model}", tests=str(len(verdicts)),
                       failures=str(sum(1 for v in verdicts if v.get("failing"))),
                       skipped=str(sum(1 for v in verdicts if v.get("verdict") == "SKIPPED")),
                       errors=str(sum(1 for v in verdicts if v.get("verdict") == "INCOMPLETE" and not v.get("failing"))))
    for v in verdicts:
        case = ET.SubElement(suite, "testcase", name=v["check"],
                             classname=f"evalsuite.{v.get('kind', 'check')}.{v.get('stage') or 'run'}")
        message = f"{v['verdict']}: {v.get('reason', '')}"
        if v.get("failing"):
            fail = ET.SubElement(case, "failure", message=message, type=v["verdict"])
            fail.text = message + (f"\n{v['command']}" if v.get("command") else "")
        elif v.get("verdict") == "INCOMPLETE":
            ET.SubElement(case, "error", message=message, type="INCOMPLETE")
        elif v.get("verdict") == "SKIPPED":
            ET.SubElement(case, "skipped", message=message)
        else:
            ET.SubElement(case, "system-out").text = message
    root = ET.Element("testsuites")
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(results: Results, path: Path) -> Path:
    return write_text_atomic(path, render_junit(results))
