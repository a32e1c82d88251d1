"""JUnit XML for every check-producing command (align's gate, converge's verdicts, ``ckptbridge gate``)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class JUnitCase:
    """One JUnit test case, whatever produced it (align's gate, ``ckptbridge gate``'s steps)."""

    classname: str
    name: str
    passed: bool
    message: str
    skipped: bool = False
    seconds: float = 0.0


def write_junit_cases(cases: list[JUnitCase], path: Path, root_name: str, suite: str, failure_type: str,
                      seconds: float = 0.0) -> None:
    """One ``testsuite`` of ``cases``: a failure element carries the message, a passing case keeps
    it in ``system-out`` (so CI shows the measured value either way), a skipped case says why."""
    failures = sum(not c.passed and not c.skipped for c in cases)
    skipped = sum(c.skipped for c in cases)
    root = ET.Element("testsuites", name=root_name, tests=str(len(cases)), failures=str(failures))
    ts = ET.SubElement(root, "testsuite", name=suite, tests=str(len(cases)), failures=str(failures), errors="0",
                       skipped=str(skipped), time=f"{seconds:.1f}")
    for c in cases:
        tc = ET.SubElement(ts, "testcase", classname=c.classname, name=c.name, time=f"{c.seconds:.3f}" if c.seconds else "0")
        if c.skipped:
            ET.SubElement(tc, "skipped", message=c.message)
        elif not c.passed:
            ET.SubElement(tc, "failure", message=c.message, type=failure_type).text = c.message
        else:
            ET.SubElement(tc, "system-out").text = c.message
    ET.indent(root)
    Path(path).write_text(ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n")
