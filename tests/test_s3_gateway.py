"""The gateway on S3-compatible object storage (KONTEXT_BLOB_URL), end to end: moto's S3 server
(fakes/s3.py), the real gateway on loopback configured through the standard AWS variables, images made
by kontext-tiny through the official OpenAI client. Every image is decoded and checked; what the bucket
holds is listed from outside the gateway."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from conftest import aws_env, open_image, png_bytes, running_server, sdk_for
from fakes.common import free_port
from fakes.s3 import SHADOWING, MotoS3
from kontext_gateway.config import Settings
from kontext_gateway.store.blobs import CACHE_CONTROL, fanned_out

PREFIX = "images"


class Env:
    def __init__(self, s3: MotoS3, bucket: str, base: str, data_dir: Path) -> None:
        self.s3, self.bucket, self.base, self.data_dir = s3, bucket, base, data_dir

    def objects(self) -> set[str]:
        return self.s3.keys(self.bucket, PREFIX + "/")

    def key(self, blob_id: str) -> str:
        return f"{PREFIX}/{fanned_out(blob_id)}"


def s3_settings(bucket: str, data_dir: Path, **overrides: object) -> Settings:
    return Settings(
        data_dir=data_dir,
        database_url=f"sqlite:///{data_dir / 'gateway.db'}",
        blob_url=f"s3://{bucket}/{PREFIX}",
        **overrides,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def env(s3: MotoS3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    bucket = s3.new_bucket()
    data_dir = tmp_path_factory.mktemp("s3-gateway")
    with aws_env(s3), running_server(s3_settings(bucket, data_dir)) as base:
        yield Env(s3, bucket, base, data_dir)


@pytest.fixture(scope="module")
def sdk(env: Env) -> Iterator[OpenAI]:
    with sdk_for(env.base) as client:
        yield client


def blob_of(url: str) -> str:
    return url.split("/v1/blobs/")[1].split("?")[0]


def test_images_are_stored_in_the_bucket_and_served_through_the_gateway(env: Env, sdk: OpenAI) -> None:
    resp = sdk.images.generate(model="kontext-tiny", prompt="a lighthouse", size="96x64", response_format="url")
    url = resp.data[0].url
    assert url is not None and url.startswith(env.base + "/v1/blobs/")
    blob_id = blob_of(url)
    assert env.key(blob_id) in env.objects()
    assert not (env.data_dir / "blobs").exists()  # nothing on local disk

    served = httpx.get(url, timeout=30)
    assert served.status_code == 200, served.text
    assert served.headers["content-type"] == "image/png"
    assert served.headers["cache-control"] == CACHE_CONTROL
    assert int(served.headers["content-length"]) == len(served.content)
    assert served.headers["etag"] == f'"{blob_id.split(".")[0]}"'
    assert hashlib.sha256(served.content).hexdigest() == blob_id.split(".")[0]
    image = open_image(served.content)
    assert image.format == "PNG" and image.size == (96, 64)

    forged = url.replace("sig=", "sig=0")
    assert httpx.get(forged, timeout=30).status_code == 403


def test_b64_json_reads_the_bucket(env: Env, sdk: OpenAI) -> None:
    import base64

    resp = sdk.images.generate(
        model="kontext-tiny", prompt="a fox", size="64x48", response_format="b64_json", output_format="webp"
    )
    assert resp.data[0].b64_json is not None
    data = base64.b64decode(resp.data[0].b64_json)
    image = open_image(data)
    assert image.format == "WEBP" and image.size == (64, 48)
    assert env.key(hashlib.sha256(data).hexdigest() + ".webp") in env.objects()


def test_edits_read_their_inputs_from_the_bucket(env: Env, sdk: OpenAI) -> None:
    source = png_bytes(80, 64)
    first = sdk.images.edit(
        model="kontext-tiny",
        image=("in.png", source, "image/png"),
        prompt="make it night",
        response_format="url",
        extra_body={"size": "80x64", "seed": 4},
    )
    assert env.key(hashlib.sha256(source).hexdigest() + ".png") in env.objects()  # the input, kept for a rerun
    assert first.data[0].url is not None
    rid = first.model_extra["metadata"]["request_id"]
    # An earlier output by its id, and by its link: both read from the bucket, never over HTTP.
    by_id = httpx.post(
        env.base + "/v1/images/edits",
        timeout=120,
        json={"model": "kontext-tiny", "prompt": "add snow", "previous_response_id": rid, "size": "80x64"},
    )
    assert by_id.status_code == 200, by_id.text
    by_link = httpx.post(
        env.base + "/v1/images/edits",
        timeout=120,
        json={
            "model": "kontext-tiny",
            "prompt": "add snow",
            "images": [{"image_url": first.data[0].url}],
            "size": "80x64",
        },
    )
    assert by_link.status_code == 200, by_link.text
    for resp in (by_id, by_link):
        image = open_image(httpx.get(resp.json()["data"][0]["url"], timeout=30).content)
        assert image.format == "PNG" and image.size == (80, 64)


def test_uploaded_files_land_in_the_bucket(env: Env) -> None:
    data = png_bytes(50, 40, fmt="JPEG")
    made = httpx.post(env.base + "/v1/files", files={"content": ("photo.jpg", data, "image/jpeg")}, timeout=30)
    assert made.status_code == 201, made.text
    digest = hashlib.sha256(data).hexdigest()
    assert made.json()["etag"] == digest
    assert env.key(f"{digest}.jpg") in env.objects()
    download = httpx.get(f"{env.base}/v1/files/{made.json()['id']}/download", timeout=30)
    assert download.status_code == 200 and download.content == data
    assert download.headers["content-type"] == "image/jpeg"


def test_a_purge_removes_the_object(env: Env, sdk: OpenAI) -> None:
    resp = sdk.images.generate(
        model="kontext-tiny", prompt="purge me", size="48x48", response_format="url", extra_body={"seed": 99}
    )
    assert resp.data[0].url is not None
    blob_id = blob_of(resp.data[0].url)
    assert env.key(blob_id) in env.objects()
    rid = resp.model_extra["metadata"]["request_id"]
    purged = httpx.delete(f"{env.base}/v1/requests/{rid}/payloads", timeout=30)
    assert purged.status_code == 200, purged.text
    assert env.key(blob_id) not in env.objects()
    gone = httpx.get(resp.data[0].url, timeout=30)  # its link still verifies: the image is gone
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "blob_not_found"


def test_presigned_links_are_fetched_from_the_store(
    env: Env, s3: MotoS3, tmp_path_factory: pytest.TempPathFactory
) -> None:
    data_dir = tmp_path_factory.mktemp("s3-presigned")
    settings = s3_settings(env.bucket, data_dir, blob_links="presigned", url_ttl_seconds=120)
    with aws_env(s3), running_server(settings) as base, sdk_for(base) as client:
        resp = client.images.generate(model="kontext-tiny", prompt="a boat", size="64x96", response_format="url")
        url = resp.data[0].url
        assert url is not None and url.startswith(f"{s3.url}/{env.bucket}/{PREFIX}/")
        assert "X-Amz-Expires=120&" in url and "X-Amz-Signature=" in url
        fetched = httpx.get(url, timeout=30)
        assert fetched.status_code == 200, fetched.text
        assert fetched.headers["content-type"] == "image/png"
        assert fetched.headers["cache-control"] == CACHE_CONTROL
        image = open_image(fetched.content)
        assert image.format == "PNG" and image.size == (64, 96)
        # The history's links are the store's too.
        rid = resp.model_extra["metadata"]["request_id"]
        (listed,) = httpx.get(f"{base}/v1/requests/{rid}", timeout=30).json()["output"]
        assert listed.startswith(f"{s3.url}/{env.bucket}/{PREFIX}/")


def kontext(*args: str, env: dict[str, str], data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kontext_gateway", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**{k: v for k, v in os.environ.items() if k not in SHADOWING}, **env, "KONTEXT_LOG_FORMAT": "text"},
    )


def test_serve_with_a_missing_bucket_fails_in_one_line(s3: MotoS3, tmp_path: Path) -> None:
    env = {**s3.env(), "KONTEXT_BLOB_URL": "s3://no-such-bucket/images"}
    done = kontext("serve", "--port", str(free_port()), env=env, data_dir=tmp_path)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: blob store s3://no-such-bucket/images at {s3.url}: the bucket does not exist: "
        "NoSuchBucket (The specified bucket does not exist)"
    ]


def test_a_worker_with_an_endpoint_out_of_reach_fails_in_one_line(s3: MotoS3, tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    env = {**s3.env(endpoint=closed), "KONTEXT_BLOB_URL": f"s3://{s3.new_bucket()}/images"}
    done = kontext("worker", env=env, data_dir=tmp_path)
    assert done.returncode == 1, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: blob store s3://") and f"cannot connect to {closed}" in line, line


def test_presigned_links_without_an_object_store_fail_in_one_line(tmp_path: Path) -> None:
    done = kontext("serve", "--port", str(free_port()), env={"KONTEXT_BLOB_LINKS": "presigned"}, data_dir=tmp_path)
    assert done.returncode == 1, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: KONTEXT_BLOB_LINKS=presigned needs an object store"), line
