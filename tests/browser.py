"""A real headless browser for page tests: Debian's chromium, one process per page load.

`load(url)` returns the DOM after scripts ran and every console message the page produced
(chromium logs them to stderr as CONSOLE lines with --enable-logging=stderr: console calls of
any level and uncaught exceptions). Failed resource loads do not show there (they go to the
DevTools protocol only): `subresources(dom)` lists what a page loads, so a test can require
none. `screenshot=` also writes a PNG.
Nothing is fetched from outside: background networking, component updates and sync are off,
and each load gets its own empty profile.

Contributors can take the same screenshot by hand (see README, "Status page"):

    python -m tests.browser http://127.0.0.1:8080/ status.png
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

CHROMIUM_BIN = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-default-apps", "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]
_CONSOLE = re.compile(r":CONSOLE(?:\(\d+\))?(?::\d+)?\]\s*(.*)")


@dataclass
class PageLoad:
    dom: str
    console: list[str]  # console messages, in order ("..." , source: URL (line))
    log: str  # chromium's whole stderr, for failure messages


def load(url: str, *, screenshot: str | Path | None = None, width: int = 1280,
         height: int = 1400, timeout: float = 60.0, binary: str = CHROMIUM_BIN) -> PageLoad:
    """Load `url` in a fresh headless chromium; the DOM, console messages, optional PNG."""
    with tempfile.TemporaryDirectory(prefix="promvae-chromium-") as profile:
        args = [binary, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"]
        if screenshot is not None:
            args.append(f"--screenshot={Path(screenshot).resolve()}")
        else:
            args.append("--dump-dom")
        proc = subprocess.run([*args, url], capture_output=True, text=True, timeout=timeout,
                              check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"chromium exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    console = [m.group(1) for line in proc.stderr.splitlines() if (m := _CONSOLE.search(line))]
    return PageLoad(dom=proc.stdout, console=console, log=proc.stderr)


_SUBRESOURCE = re.compile(r"<(?:img|script|iframe|audio|video|source|embed)\b[^>]*"
                          r"\bsrc=\"([^\"]*)\"|<link\b[^>]*\bhref=\"([^\"]*)\"", re.IGNORECASE)


def subresources(dom: str) -> list[str]:
    """URLs of images, scripts, frames, media and <link>s the DOM loads (data: URLs too)."""
    return [a or b for a, b in _SUBRESOURCE.findall(dom)]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m tests.browser URL OUT.png", file=sys.stderr)
        return 2
    page = load(argv[0], screenshot=argv[1])
    for message in page.console:
        print(f"console: {message}", file=sys.stderr)
    print(f"wrote {argv[1]}")
    return 1 if page.console else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
