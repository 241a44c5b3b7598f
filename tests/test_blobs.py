"""Local blob store and signed URLs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from kontext_gateway.links import URLSigner
from kontext_gateway.store.blobs import LocalBlobStore


@pytest.fixture
def store(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs")


def test_put_get_round_trip(store: LocalBlobStore, tmp_path: Path) -> None:
    data = b"\x89PNG fake image bytes"
    blob_id = store.put(data, ext="png")
    digest = hashlib.sha256(data).hexdigest()
    assert blob_id == f"{digest}.png"
    assert store.get(blob_id) == data
    assert store.path(blob_id) == tmp_path / "blobs" / digest[:2] / digest[2:4] / blob_id
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "blobs").rglob("*"))


def test_same_content_same_id(store: LocalBlobStore) -> None:
    assert store.put(b"abc", ext="png") == store.put(b"abc", ext="png")
    assert store.put(b"abc", ext="png") != store.put(b"abd", ext="png")
    assert store.put(b"abc", ext=".JPEG") == hashlib.sha256(b"abc").hexdigest() + ".jpg"


def test_put_rejects_unknown_extension(store: LocalBlobStore) -> None:
    with pytest.raises(ValueError):
        store.put(b"x", ext="exe")
    with pytest.raises(ValueError):
        store.put(b"x", ext="png/../../x")


def test_missing_blob(store: LocalBlobStore) -> None:
    assert store.get("0" * 64 + ".png") is None
    assert store.path("0" * 64 + ".png") is None


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
        "{H}.png",
        "{h}0.png",
        "",
    ],
)
def test_invalid_ids_rejected(store: LocalBlobStore, blob_id: str) -> None:
    h = store.put(b"real", ext="png").split(".")[0]
    bad = blob_id.format(h=h, H=h.upper())
    assert store.path(bad) is None
    assert store.get(bad) is None


def test_path_outside_root_not_served(store: LocalBlobStore, tmp_path: Path) -> None:
    (tmp_path / "secret.png").write_bytes(b"secret")
    assert store.get(str(tmp_path / "secret.png")) is None


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
