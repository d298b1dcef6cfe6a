"""Wait for a local HTTP service a test started (Prometheus, an MLflow server) to answer 200."""
from __future__ import annotations

import subprocess
import time
import urllib.request


def wait_http_ok(url: str, proc: subprocess.Popen, timeout: float, what: str) -> None:
    """Until ``url`` answers 200; RuntimeError naming ``what`` if its process exits or ``timeout`` passes."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as res:
                if res.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} not ready after {timeout:.0f}s")
