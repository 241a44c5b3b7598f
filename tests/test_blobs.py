"""The blob stores, each through the same tests: the local directory and S3-compatible object storage
(moto's S3 server, fakes/s3.py). And the gateway's signed URLs."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from obstore.exceptions import PermissionDeniedError

from conftest import aws_env, cached_pages, open_image, png_bytes, skip_unless_pages_can_be_dropped
from fakes.s3 import MotoS3, MotoUnavailable, moto_s3
from kontext_gateway.config import Settings
from kontext_gateway.links import URLSigner
from kontext_gateway.store import s3blobs
from kontext_gateway.store.blob_url import open_blob_store
from kontext_gateway.store.blobs import (
    CACHE_CONTROL,
    BlobStore,
    BlobStoreUnavailable,
    LocalBlobStore,
    fanned_out,
)
from kontext_gateway.store.s3blobs import S3BlobStore

MIB = 1024 * 1024
PREFIX = "gw/blobs"


class Stored:
    """A store under test and a look at what it holds, from outside it: the files under the folder, or
    the keys in the bucket (relative to the root or prefix)."""

    def __init__(self, store: BlobStore, tmp_path: Path, s3: MotoS3 | None = None, bucket: str = "") -> None:
        self.store, self.tmp_path, self.s3, self.bucket = store, tmp_path, s3, bucket

    def names(self) -> set[str]:
        if self.s3 is not None:
            return {k.removeprefix(PREFIX + "/") for k in self.s3.keys(self.bucket, PREFIX + "/")}
        root = self.tmp_path / "blobs"
        return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(params=["local", "s3"])
def stored(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stored]:
    if request.param == "local":
        yield Stored(LocalBlobStore(tmp_path / "blobs"), tmp_path)
        return
    s3: MotoS3 = request.getfixturevalue("s3")
    bucket = s3.new_bucket()
    with aws_env(s3):
        yield Stored(S3BlobStore(f"s3://{bucket}/{PREFIX}"), tmp_path, s3, bucket)


@pytest.fixture
def store(stored: Stored) -> BlobStore:
    return stored.store


async def read_all(store: BlobStore, blob_id: str) -> bytes:
    blob = await store.open(blob_id)
    assert blob is not None
    data = b"".join([chunk async for chunk in blob.chunks])
    assert len(data) == blob.size
    return data


@pytest.mark.parametrize(("fmt", "ext"), [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"), ("GIF", "gif")])
async def test_real_images_round_trip(stored: Stored, fmt: str, ext: str) -> None:
    store = stored.store
    data = png_bytes(160, 120, fmt=fmt)
    blob_id = await store.put(data, ext=ext)
    assert blob_id == f"{hashlib.sha256(data).hexdigest()}.{ext}"
    assert await store.get(blob_id) == data
    image = open_image(await read_all(store, blob_id))
    assert image.format == fmt and image.size == (160, 120)
    assert await store.exists(blob_id)
    blob = await store.open(blob_id)
    assert blob is not None and blob.media_type == f"image/{fmt.lower()}"
    # Where the local directory has always put it: a data directory's blobs/ copied into a bucket is
    # what an object store reads.
    assert stored.names() == {fanned_out(blob_id)} == {f"{blob_id[:2]}/{blob_id[2:4]}/{blob_id}"}


async def test_same_bytes_same_id(stored: Stored) -> None:
    store = stored.store
    first = await store.put(b"abc", ext="png")
    assert await store.put(b"abc", ext="png") == first
    assert await store.put(b"abd", ext="png") != first
    assert await store.put(b"abc", ext=".JPEG") == hashlib.sha256(b"abc").hexdigest() + ".jpg"
    assert len(stored.names()) == 3  # abc.png once, abd.png, abc.jpg


async def test_concurrent_puts_of_the_same_bytes_store_one_blob(stored: Stored) -> None:
    data = png_bytes(256, 256)
    ids = await asyncio.gather(*(stored.store.put(data, ext="png") for _ in range(16)))
    assert set(ids) == {f"{hashlib.sha256(data).hexdigest()}.png"}
    assert stored.names() == {fanned_out(ids[0])}  # one blob, no temporary file left behind
    assert await stored.store.get(ids[0]) == data


async def test_put_rejects_unknown_extension(store: BlobStore) -> None:
    for ext in ("exe", "png/../../x", ""):
        with pytest.raises(ValueError):
            await store.put(b"x", ext=ext)


async def test_unknown_blob(store: BlobStore) -> None:
    unknown = "0" * 64 + ".png"
    assert await store.get(unknown) is None
    assert await store.open(unknown) is None
    assert not await store.exists(unknown)
    await store.delete(unknown)  # nothing to delete: not an error


@pytest.mark.parametrize(
    "blob_id",
    [
        "../x",
        "../../etc/passwd",
        "/etc/passwd",
        "{h}.exe",
        "{h}.PNG",
        "{h}",
        "{h}.png\n",
        "{h}.png/..",
        "../{h}.png",
        "{h[:2]}/{h[2:4]}/{h}.png",
        "{H}.png",
        "{h}0.png",
        "",
    ],
)
async def test_malformed_ids_are_never_looked_up(stored: Stored, blob_id: str) -> None:
    store = stored.store
    real = await store.put(b"real", ext="png")
    bad = blob_id.replace("{h[:2]}", real[:2]).replace("{h[2:4]}", real[2:4])
    bad = bad.format(h=real.split(".")[0], H=real.split(".")[0].upper())
    assert await store.get(bad) is None
    assert await store.open(bad) is None
    assert not await store.exists(bad)
    await store.delete(bad)
    assert stored.names() == {fanned_out(real)}  # the real one is untouched


async def test_delete(stored: Stored) -> None:
    store = stored.store
    gone = await store.put(png_bytes(32, 32), ext="png")
    kept = await store.put(png_bytes(48, 48), ext="png")
    await store.delete(gone)
    assert await store.get(gone) is None and not await store.exists(gone) and await store.open(gone) is None
    assert stored.names() == {fanned_out(kept)}
    await store.delete(gone)  # already gone
    await store.delete()
    assert await store.get(kept) is not None


async def test_delete_many_at_once(stored: Stored) -> None:
    ids = [await stored.store.put(png_bytes(16 + i, 16), ext="png") for i in range(5)]
    await stored.store.delete(*ids[:4], "0" * 64 + ".png", "../nope")
    assert stored.names() == {fanned_out(ids[4])}


async def test_large_object(stored: Stored) -> None:
    data = os.urandom(12 * MIB)  # above obstore's multipart threshold: still one object, whole
    blob_id = await stored.store.put(data, ext="png")
    assert blob_id == hashlib.sha256(data).hexdigest() + ".png"
    assert await stored.store.get(blob_id) == data
    assert await read_all(stored.store, blob_id) == data
    assert stored.names() == {fanned_out(blob_id)}


async def test_writable(store: BlobStore, stored: Stored) -> None:
    before = stored.names()
    await store.writable()
    await store.writable()
    assert stored.names() == before  # the probe leaves nothing behind


async def test_presigned_urls(store: BlobStore) -> None:
    data = png_bytes(40, 30)
    blob_id = await store.put(data, ext="png")
    if not store.presigns:
        with pytest.raises(NotImplementedError):
            store.presigned_url(blob_id, 60)
        return
    url = store.presigned_url(blob_id, 60)
    assert "X-Amz-Expires=60&" in url and "X-Amz-Signature=" in url and f"/{PREFIX}/{fanned_out(blob_id)}?" in url
    async with httpx.AsyncClient() as client:
        resp = await client.get(url)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "image/png" and resp.headers["cache-control"] == CACHE_CONTROL
    assert resp.content == data
    # SigV4 presigned URLs live a week at most: a longer TTL is capped, not refused.
    assert "X-Amz-Expires=604800&" in store.presigned_url(blob_id, 30 * 24 * 3600)
    with pytest.raises(ValueError):
        store.presigned_url("../" + blob_id, 60)


async def test_close_finishes_a_write_already_begun(stored: Stored) -> None:
    """Shutting down while a result is being written: the caller has stopped waiting (its job was
    cancelled), yet close() returns only once the blob is whole in the store, with nothing left aside."""
    store = stored.store
    data = png_bytes(64, 48)
    begun, release = threading.Event(), threading.Event()
    write = store._put  # type: ignore[attr-defined]

    def held_write(data: bytes, *how: object) -> str:  # the extension, and the local store's cache hint
        begun.set()
        release.wait(30)
        return write(data, *how)

    store._put = held_write  # type: ignore[attr-defined]
    put = asyncio.ensure_future(store.put(data, ext="png"))
    assert await asyncio.to_thread(begun.wait, 30)
    put.cancel()
    closing = asyncio.ensure_future(store.close())
    await asyncio.sleep(0.05)
    assert not closing.done()  # the write is still held: close waits for it
    release.set()
    await closing
    blob_id = hashlib.sha256(data).hexdigest() + ".png"
    assert stored.names() == {fanned_out(blob_id)}  # the whole blob, no temporary file beside it


# -- the local directory's own ----------------------------------------------------------------------------


async def test_local_layout_and_no_temporary_files(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    data = b"\x89PNG fake image bytes"
    blob_id = await store.put(data, ext="png")
    digest = hashlib.sha256(data).hexdigest()
    assert store.path(blob_id) == tmp_path / "blobs" / digest[:2] / digest[2:4] / blob_id
    blob = await store.open(blob_id)
    assert blob is not None and blob.path == store.path(blob_id)  # served as a file
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "blobs").rglob("*"))


async def test_a_local_result_leaves_the_page_cache_and_an_input_stays(tmp_path: Path) -> None:
    """A result (`cached=False`) is read back once at most: its pages are let go once it is durable; an
    input, read back when its job runs, stays cached. Both read back whole."""
    skip_unless_pages_can_be_dropped(tmp_path)
    store = LocalBlobStore(tmp_path / "blobs")
    try:
        result, kept = os.urandom(MIB), os.urandom(MIB)
        result_id = await store.put(result, ext="png", cached=False)
        kept_id = await store.put(kept, ext="png")
        result_path, kept_path = store.path(result_id), store.path(kept_id)
        assert result_path is not None and kept_path is not None
        assert cached_pages(result_path) == (0, 256)
        assert cached_pages(kept_path) == (256, 256)
        assert await store.get(result_id) == result and await store.get(kept_id) == kept
    finally:
        await store.close()


async def test_a_local_write_that_fails_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk that fills up during a put: the put fails with the OS's error, no temporary file and no
    blob are left, and the same bytes are stored whole once the disk has room again."""
    store = LocalBlobStore(tmp_path / "blobs")
    data = b"\x89PNG fake image bytes"
    real_fsync = os.fsync

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        await store.put(data, ext="png")
    assert [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()] == []
    monkeypatch.setattr(os, "fsync", real_fsync)
    blob_id = await store.put(data, ext="png")
    assert await store.get(blob_id) == data
    assert [p.name for p in (tmp_path / "blobs").rglob("*") if p.is_file()] == [blob_id]


async def test_local_path_outside_root_not_served(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    (tmp_path / "secret.png").write_bytes(b"secret")
    assert await store.get(str(tmp_path / "secret.png")) is None
    assert store.path(str(tmp_path / "secret.png")) is None


async def test_local_store_that_cannot_be_written(tmp_path: Path) -> None:
    (tmp_path / "taken").write_bytes(b"a file where the folder would be")
    with pytest.raises(BlobStoreUnavailable) as caught:
        await LocalBlobStore(tmp_path / "taken").writable()
    assert str(tmp_path / "taken") in str(caught.value) and "\n" not in str(caught.value)


# -- S3: what a bad configuration says ----------------------------------------------------------------------


def one_line(exc: pytest.ExceptionInfo[BlobStoreUnavailable]) -> str:
    text = str(exc.value)
    assert "\n" not in text and len(text) < 400, text
    return text


async def test_missing_bucket(s3: MotoS3) -> None:
    with aws_env(s3):
        store = S3BlobStore("s3://no-such-bucket-here/p")
    with pytest.raises(BlobStoreUnavailable) as caught:
        await store.writable()
    text = one_line(caught)
    assert text.startswith(f"blob store s3://no-such-bucket-here/p at {s3.url}: the bucket does not exist"), text


async def test_endpoint_out_of_reach(s3: MotoS3) -> None:
    closed = f"http://127.0.0.1:{_closed_port()}"
    with aws_env(s3, endpoint=closed):
        store = S3BlobStore(f"s3://{s3.new_bucket()}")
    with pytest.raises(BlobStoreUnavailable) as caught:
        await store.writable()
    assert f"cannot connect to {closed}" in one_line(caught)


async def test_wrong_credentials(s3: MotoS3) -> None:
    with ExitStack() as stack:
        try:  # a server of its own, which checks every request's signature (the session's takes any)
            strict = stack.enter_context(moto_s3(require_auth=True))
        except MotoUnavailable as exc:
            pytest.skip(str(exc))
        with aws_env(strict):
            store = S3BlobStore("s3://any-bucket/p")
        with pytest.raises(BlobStoreUnavailable) as caught:
            await store.writable()
    assert "the access key is unknown (AWS_ACCESS_KEY_ID): InvalidAccessKeyId" in one_line(caught)


async def test_a_read_refused_is_a_missing_blob_said_once(
    s3: MotoS3, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Without s3:ListBucket, S3 answers 403 (not 404) for a key that is not there: a missing blob for
    whoever asked, not a server error, and one warning naming the permission."""
    with aws_env(s3):
        store = S3BlobStore(f"s3://{s3.new_bucket()}/p")
    kept = await store.put(png_bytes(8, 8), ext="png")

    def refuse(*_: object, **__: object) -> None:
        raise PermissionDeniedError("the object store answered 403 Forbidden: AccessDenied")

    monkeypatch.setattr(s3blobs.obstore, "get", refuse)
    monkeypatch.setattr(s3blobs.obstore, "head", refuse)
    gone = "0" * 64 + ".png"
    with caplog.at_level(logging.WARNING, logger=s3blobs.__name__):
        assert await store.get(gone) is None and await store.open(gone) is None
        assert not await store.exists(gone) and not await store.exists(kept)
    warnings = [r.getMessage() for r in caplog.records if r.name == s3blobs.__name__]
    assert len(warnings) == 1 and "s3:ListBucket" in warnings[0] and "(403)" in warnings[0]


def test_blob_url_forms(tmp_path: Path) -> None:
    assert isinstance(open_blob_store(Settings(data_dir=tmp_path)), LocalBlobStore)
    for url in ("gs://bucket/x", "s3://", "s3:///x", "s3://bucket?x=1", "/var/lib/blobs"):
        with pytest.raises(BlobStoreUnavailable) as caught:
            open_blob_store(Settings(data_dir=tmp_path, blob_url=url))
        assert "KONTEXT_BLOB_URL" in str(caught.value)
    with pytest.raises(BlobStoreUnavailable, match="KONTEXT_BLOB_LINKS=presigned needs an object store"):
        open_blob_store(Settings(data_dir=tmp_path, blob_links="presigned"))
    store = open_blob_store(Settings(data_dir=tmp_path, blob_url="s3://bucket/a/b/"))
    assert isinstance(store, S3BlobStore) and store.url == "s3://bucket/a/b"


def _closed_port() -> int:
    from fakes.common import free_port

    return free_port()  # bound and released: nothing listens on it


NOW = 1_700_000_000.0
PATH = "/v1/files/" + "a" * 64 + ".png"


@pytest.fixture
def signer() -> URLSigner:
    return URLSigner(b"k" * 32)


def _parts(query: str) -> tuple[str, str]:
    fields = dict(item.split("=", 1) for item in query.split("&"))
    assert set(fields) == {"exp", "sig"}
    return fields["exp"], fields["sig"]


def test_sign_and_verify(signer: URLSigner) -> None:
    exp, sig = _parts(signer.sign(PATH, 3600, now=NOW))
    assert exp == str(int(NOW) + 3600)
    assert "=" not in sig and "+" not in sig and "/" not in sig  # b64url, unpadded
    assert signer.verify(PATH, exp, sig, now=NOW)
    assert signer.verify(PATH, exp, sig, now=NOW + 3600)  # valid through its expiry second


def test_tampered(signer: URLSigner) -> None:
    exp, sig = _parts(signer.sign(PATH, 3600, now=NOW))
    assert not signer.verify(PATH.replace("a", "b", 1), exp, sig, now=NOW)
    assert not signer.verify(PATH, str(int(exp) + 1), sig, now=NOW)
    assert not signer.verify(PATH, exp, ("A" if sig[0] != "A" else "B") + sig[1:], now=NOW)
    assert not URLSigner(b"other secret").verify(PATH, exp, sig, now=NOW)


def test_expired(signer: URLSigner) -> None:
    exp, sig = _parts(signer.sign(PATH, 60, now=NOW))
    assert not signer.verify(PATH, exp, sig, now=NOW + 61)


def test_malformed(signer: URLSigner) -> None:
    exp, sig = _parts(signer.sign(PATH, 3600, now=NOW))
    bad_exps = ["", "abc", "-1", "+" + exp, " " + exp, exp + " ", exp[:2] + "_" + exp[2:], "0" + exp, "١٧٠٠", "9" * 40]
    bad_sigs = ["", sig + "=", sig + "x", sig[:-1], "é" * len(sig), sig.upper()]
    for bad_exp in bad_exps:
        assert not signer.verify(PATH, bad_exp, sig, now=NOW), bad_exp
    for bad_sig in bad_sigs:
        assert not signer.verify(PATH, exp, bad_sig, now=NOW), bad_sig
    assert not signer.verify(PATH, None, sig, now=NOW)  # type: ignore[arg-type]
    assert not signer.verify(PATH, exp, None, now=NOW)  # type: ignore[arg-type]


def test_empty_secret_refused() -> None:
    with pytest.raises(ValueError):
        URLSigner(b"")
