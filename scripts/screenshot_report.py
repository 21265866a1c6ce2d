#!/usr/bin/env python3
"""Screenshot a release report in headless Chromium: ``screenshot_report.py report.html out.png``.

Also accepts a results.json, which is rendered to report.html beside the PNG first. Chromium comes
from the Debian package ``chromium`` (``apt-get install chromium``); it runs with
``--headless --no-sandbox --disable-gpu`` so it works as root in CI.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_browser() -> str | None:
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


def screenshot(html: Path, png: Path, width: int = 1280, height: int = 4000, timeout: int = 90) -> Path:
    browser = find_browser()
    if browser is None:
        raise SystemExit(f"no Chromium found (tried {', '.join(BROWSERS)}); install the Debian package 'chromium'")
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
               f"--window-size={width},{height}", f"--screenshot={png.resolve()}", html.resolve().as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not png.is_file():
        raise SystemExit(f"chromium failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return png


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("report", type=Path, help="report.html, or a results.json to render first")
    p.add_argument("png", type=Path, help="where to write the screenshot")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=4000)
    args = p.parse_args(argv)
    html = args.report
    if html.suffix == ".json":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from evalsuite.report import write_reports
        from evalsuite.results import Results

        write_reports(Results.load(html), args.png.parent, formats=("html",))
        html = args.png.parent / "report.html"
    print(screenshot(html, args.png, args.width, args.height))
    return 0


if __name__ == "__main__":
    sys.exit(main())
