"""A container health check without curl (the image has none): GET each URL given, or those
in $TESSERA_HEALTH_URL; exit 0 when every one answers 2xx, 1 otherwise. No URL at all means
no check applies (make-model, a one-shot job), which is healthy.

    python -m tessera.healthcheck http://127.0.0.1:8000/ready
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main(urls: list[str]) -> int:
    urls = urls or os.environ.get("TESSERA_HEALTH_URL", "").split()
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=3) as response:
                if not 200 <= response.status < 300:
                    raise urllib.error.URLError(f"status {response.status}")
        except (OSError, urllib.error.URLError) as exc:
            print(f"unhealthy: {url}: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
