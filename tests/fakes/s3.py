"""A real S3 HTTP endpoint for the blob-store tests: moto's standalone server (`moto[server]`, in the test
extra) as a subprocess on a free loopback port, which speaks S3's REST protocol (SigV4, presigned URLs,
conditional and bulk requests) as AWS documents it.

Buckets are made and listed with plain HTTP requests: moto takes them unsigned, and the gateway's own
client (obstore) is what the tests exercise. `env()` is the environment a gateway needs to reach it,
the standard AWS variables and nothing else.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from fakes.common import free_port, stop

ACCESS_KEY = "AKIDEXAMPLETESTING01"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
REGION = "us-east-1"
# Variables of the machine's that would take precedence over the endpoint, keys and region above.
SHADOWING = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT", "AWS_SESSION_TOKEN", "AWS_TOKEN", "AWS_DEFAULT_REGION")


class MotoUnavailable(Exception):
    """moto's server cannot run here; the message says why (the tests that need it skip with it)."""


class MotoS3:
    def __init__(self, url: str) -> None:
        self.url = url

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """AWS_* variables for a client of this server (or of `endpoint`, e.g. a port nothing listens on)."""
        return {
            "AWS_ENDPOINT_URL": endpoint or self.url,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
        }

    def new_bucket(self) -> str:
        """A fresh, empty bucket (its name)."""
        name = f"kontext-{uuid.uuid4().hex[:16]}"
        resp = httpx.put(f"{self.url}/{name}", timeout=30)
        assert resp.status_code == 200, resp.text
        return name

    def keys(self, bucket: str, prefix: str = "") -> set[str]:
        """Every object key in `bucket` under `prefix` (ListObjectsV2, all pages)."""
        keys: set[str] = set()
        token: str | None = None
        while True:
            params = {"list-type": "2", "prefix": prefix, **({"continuation-token": token} if token else {})}
            resp = httpx.get(f"{self.url}/{bucket}", params=params, timeout=30)
            assert resp.status_code == 200, resp.text
            keys.update(re.findall(r"<Key>([^<]*)</Key>", resp.text))
            found = re.search(r"<NextContinuationToken>([^<]*)</NextContinuationToken>", resp.text)
            if found is None:
                return keys
            token = found.group(1)


@contextmanager
def moto_s3(*, timeout_s: float = 60.0, require_auth: bool = False) -> Iterator[MotoS3]:
    """moto's S3 server on a free loopback port, answering once this yields; stopped afterwards.
    `require_auth`: every request must be signed by an access key moto knows (none are: any key is
    refused), to see what a gateway with wrong credentials does. Raises MotoUnavailable when it
    cannot start."""
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
        raise MotoUnavailable("moto's S3 server is not installed: pip install 'moto[server]' (the test extra)")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if require_auth else {}
    with tempfile.TemporaryDirectory(prefix="moto-") as tmp:
        log = Path(tmp) / "moto.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env},
            )
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    httpx.get(f"{url}/moto-api/", timeout=2)
                    break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise MotoUnavailable(f"moto's S3 server did not start: {log.read_text()[-1000:]}")
                time.sleep(0.1)
            yield MotoS3(url)
        finally:
            stop(proc)
