"""The official `openai` npm package drives the gateway unchanged (tests/js/client.mjs)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from conftest import open_image, png_bytes

JS = Path(__file__).parent / "js"


@pytest.fixture(scope="module")
def node_client() -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js and npm are not installed")
    if not (JS / "node_modules" / "openai").is_dir():
        out = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"], cwd=JS, capture_output=True, text=True, timeout=300
        )
        if out.returncode != 0:
            pytest.skip(f"npm ci failed (registry unreachable?): {out.stderr[-500:]}")
    return JS / "client.mjs"


def test_openai_npm_package(node_client: Path, base_url: str, tmp_path: Path) -> None:
    source = tmp_path / "source.png"
    source.write_bytes(png_bytes(80, 60))
    out = subprocess.run(
        ["node", str(node_client), base_url + "/v1", str(source)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    gen = open_image(base64.b64decode(result["generated"]["b64"]))
    assert gen.format == "WEBP" and gen.size == (96, 64) and result["generated"]["size"] == "96x64"
    assert result["generated"]["metadata"]["model"] == "kontext-tiny"
    edited = open_image(httpx.get(result["edited"]["url"]).content)
    assert edited.format == "PNG" and edited.size == (64, 64)
    assert result["notFound"]["status"] == 404 and result["notFound"]["code"] == "model_not_found"
    assert "Did you mean 'flux.1-kontext-pro'?" in result["notFound"]["message"]
