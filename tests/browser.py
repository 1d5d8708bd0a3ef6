"""Headless Chromium from Debian's packages, for the tests that look at a page in a real browser.

`python -m tests.browser` installs it (apt-get, as root) when /usr/bin/chromium is missing; the
`chromium` fixture does the same on first use, so a clean machine needs no step of its own. Playwright
drives it; it cannot download its own browsers here, so it is always given this executable.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parent.parent / ".artifacts"
"""Screenshots the browser tests leave for a person to look at (git-ignored)."""


def ensure_chromium() -> str | None:
    """Installs Chromium if it is missing; returns None when it is there, else why it cannot be."""
    if CHROMIUM.exists():
        return None
    if shutil.which("apt-get") is None:
        return "Chromium is not installed and there is no apt-get to install it (install the chromium package)"
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        return "Chromium is not installed and installing it needs root: run `apt-get install -y chromium`"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for step in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
        done = subprocess.run(step, check=False, env=env, capture_output=True, text=True, timeout=1200)
        if done.returncode != 0:
            return f"`{' '.join(step)}` failed: {(done.stderr or done.stdout).strip()[-300:]}"
    return None if CHROMIUM.exists() else "apt-get installed chromium, but /usr/bin/chromium is not there"


if __name__ == "__main__":
    problem = ensure_chromium()
    print(problem or f"{CHROMIUM} is ready", file=sys.stderr if problem else sys.stdout)
    sys.exit(1 if problem else 0)
