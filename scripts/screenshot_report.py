"""Write a full-page PNG screenshot of a moekit HTML report with headless Chromium.

Usage: python scripts/screenshot_report.py REPORT.html OUT.png [--width 1400]

The page height is measured first (headless Chromium renders a copy of the report with a tiny
inline script that writes ``document.documentElement.scrollHeight`` into the DOM, read back with
``--dump-dom``), then the screenshot is taken with that window height.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--mute-audio")


def find_chromium() -> str | None:
    """Path of a Chromium / Chrome binary on PATH, or None."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def run_chromium(binary: str, args: list[str], timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run headless Chromium with a throw-away profile; returns the completed process (text output)."""
    with tempfile.TemporaryDirectory(prefix="moekit-chromium-") as profile:
        cmd = [binary, *FLAGS, f"--user-data-dir={profile}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def page_height(binary: str, report: Path, width: int) -> int:
    """Rendered height in CSS pixels of ``report`` at ``width``."""
    probe = ("<script>window.addEventListener('load',function(){var d=document.createElement('div');"
             "d.id='moekit-height';d.textContent=String(document.documentElement.scrollHeight);"
             "document.body.appendChild(d);});</script>")
    text = report.read_text(encoding="utf-8")
    text = text.replace("</body>", probe + "</body>", 1)
    text = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", text, count=1)  # let the probe run
    with tempfile.TemporaryDirectory(prefix="moekit-shot-") as tmp:
        copy = Path(tmp) / "probe.html"
        copy.write_text(text, encoding="utf-8")
        res = run_chromium(binary, [f"--window-size={width},1000", "--virtual-time-budget=5000", "--dump-dom",
                                    copy.as_uri()])
    m = re.search(r'id="moekit-height">(\d+)<', res.stdout)
    if not m:
        raise RuntimeError(f"could not measure the page height; chromium said: {res.stderr[-500:]}")
    return int(m.group(1))


def screenshot(report: Path, out: Path, width: int = 1400) -> Path:
    """Write a full-page PNG of ``report`` to ``out``; returns ``out``."""
    binary = find_chromium()
    if binary is None:
        raise RuntimeError("no chromium binary found (Debian: apt-get install chromium)")
    report = report.resolve()
    height = page_height(binary, report, width)
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    res = run_chromium(binary, [f"--window-size={width},{height}", "--virtual-time-budget=5000",
                                f"--screenshot={out}", report.as_uri()])
    if not out.is_file():
        raise RuntimeError(f"chromium wrote no screenshot; it said: {res.stderr[-500:]}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path, help="the HTML report")
    ap.add_argument("out", type=Path, help="PNG to write")
    ap.add_argument("--width", type=int, default=1400, help="window width in pixels (default 1400)")
    args = ap.parse_args(argv)
    if not args.report.is_file():
        print(f"error: {args.report} not found", file=sys.stderr)
        return 2
    try:
        path = screenshot(args.report, args.out, args.width)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
