"""A container health check without curl (the image has none): GET each http:// URL given,
or those in $TESSERA_HEALTH_URL, and connect to each tcp://HOST:PORT; exit 0 when every URL
answers 2xx and every port accepts, 1 otherwise. No URL at all means no check applies
(make-model, a one-shot job), which is healthy.

    python -m tessera.healthcheck http://127.0.0.1:8002/health tcp://127.0.0.1:50061
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request


def _check(url: str) -> None:
    if url.startswith("tcp://"):
        address = urllib.parse.urlsplit(url)
        socket.create_connection((address.hostname, address.port), timeout=3).close()
        return
    with urllib.request.urlopen(url, timeout=3) as response:
        if not 200 <= response.status < 300:
            raise urllib.error.URLError(f"status {response.status}")


def main(urls: list[str]) -> int:
    urls = urls or os.environ.get("TESSERA_HEALTH_URL", "").split()
    for url in urls:
        try:
            _check(url)
        except (OSError, urllib.error.URLError) as exc:
            print(f"unhealthy: {url}: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
