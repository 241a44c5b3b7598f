"""Hostile input, property-based: whatever a client sends, the gateway answers it, and keeps answering.

Hypothesis builds requests for every endpoint that reads a body or query parameters (images JSON
and multipart, predictions, files, admin keys, the listings) out of hostile pieces: lone surrogates
sent as the JSON escapes an attacker writes (`"\\ud800"`), NUL, right-to-left marks, emoji, very long
strings, bytes that are not UTF-8, nesting 1000 levels deep (in bodies and inside base64 cursors),
numbers no float holds (1e400, NaN, Infinity, 2**64, -0), malformed and inward-pointing URLs, wrong
types and unknown fields. Bodies are built as bytes here: `json.dumps` cannot write most of this.

Every answer must be: a status under 500; for a 4xx, a JSON body in the OpenAI envelope with a
message; then the server still answers /health. A prediction that really runs must not end in a
server error either (its 201 comes before the job). Each property runs on SQLite and on PostgreSQL
(skipped when PostgreSQL is not reachable): PostgreSQL refuses text that SQLite stores.

Rules of the suite:
- Nothing leaves loopback. URLs are IP literals (loopback, link-local) or malformed, or this
  gateway's own; never a host name, which the gateway would look up (see `_local_only`).
- A request that could really generate asks for 64x64 at one or two steps; any other is sent with
  `?dryRun=true`, which validates everything and runs nothing.
- Few examples per endpoint and a fixed seed: fast and the same on every run.
- `REGRESSIONS` pins, one test each, inputs that once took the server down.
"""

from __future__ import annotations

import base64
import io
import json
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_from_bytes

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import running_server
from kontext_gateway.config import Settings

ADMIN = "kx-hostile-input-admin-key"
TINY = "kontext-gateway/kontext-tiny"
OWN = "http://gateway.own"  # replaced by the gateway's own base URL before a request is sent

FAST = settings(
    max_examples=25,
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    suppress_health_check=list(HealthCheck),
)


def few(n: int) -> settings:
    return settings(FAST, max_examples=n)


# -- bodies as bytes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """JSON text placed in a body as it is: what `json.dumps` never writes (1e400, -0, nesting past the
    encoder's recursion, bytes that are not UTF-8)."""

    token: bytes

    def __repr__(self) -> str:
        head = self.token[:40]
        return f"Raw({head!r}{f'... {len(self.token)} bytes' if len(self.token) > 40 else ''})"


def encode(value: Any) -> bytes:
    """`value` as JSON bytes. Strings are escaped (`ensure_ascii`): a lone surrogate becomes the six
    characters `\\ud800`, as an attacker sends it; NaN and Infinity become those tokens; Raw is
    spliced in (also as an object key)."""
    raws: list[bytes] = []

    def mark(token: bytes) -> str:
        raws.append(token)
        return f"\x00raw{len(raws) - 1}\x00"

    def swap(v: Any) -> Any:
        if isinstance(v, Raw):
            return mark(v.token)
        if isinstance(v, dict):
            return {(mark(k.token) if isinstance(k, Raw) else k): swap(x) for k, x in v.items()}
        if isinstance(v, list):
            return [swap(x) for x in v]
        return v

    out = json.dumps(swap(value), ensure_ascii=True, allow_nan=True).encode()
    for i, token in enumerate(raws):
        out = out.replace(json.dumps(f"\x00raw{i}\x00").encode(), token)
    return out


@dataclass(frozen=True)
class Part:
    """One part of a multipart body, every byte of it chosen by the test."""

    name: bytes
    data: bytes
    filename: bytes | None = None
    content_type: bytes | None = None


BOUNDARY = b"hostile-7c1e0b"


def multipart(parts: list[Part]) -> bytes:
    out = b""
    for p in parts:
        disposition = b'form-data; name="' + p.name + b'"'
        if p.filename is not None:
            disposition += b'; filename="' + p.filename + b'"'
        out += b"--" + BOUNDARY + b"\r\nContent-Disposition: " + disposition + b"\r\n"
        if p.content_type is not None:
            out += b"Content-Type: " + p.content_type + b"\r\n"
        out += b"\r\n" + p.data + b"\r\n"
    return out + b"--" + BOUNDARY + b"--\r\n"


MULTIPART = f"multipart/form-data; boundary={BOUNDARY.decode()}"


def utf8(text: str) -> bytes:
    """Text as a client's bytes; a lone surrogate becomes the invalid UTF-8 it encodes to (ED A0 80)."""
    return text.encode("utf-8", "surrogatepass")


# -- images -----------------------------------------------------------------------------------------


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 140, 200)).save(buf, "PNG")
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims `width` x `height` (a decompression bomb's first bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


PNG = png(16, 16)
DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()
IMAGE_BYTES = [
    PNG,
    b"",
    b"\x00",
    b"GIF89a",
    PNG[:40],
    b"\x89PNG\r\n\x1a\n" + b"\xff" * 64,
    png_claiming(65535, 65535),
    png_claiming(0, 0),
    b"<svg><rect width='9'/></svg>",
    b"\xff\xd8\xff" + b"\x00" * 32,
]

# -- hostile values ---------------------------------------------------------------------------------

SURROGATES = ["\ud800", "\udfff", "a\udc00b", "\ud83d", "\ud800\ud800"]
TEXTS = [
    *SURROGATES,
    "\x00",
    "a\x00b",
    "\u202egnp.exe",
    "مرحبا بالعالم",
    "שלום\u200f",
    "🦊",
    "👩‍👩‍👧‍👦",
    "\ufeff",
    "Z̴̡̛a̷l̶g̸o̵",
    "",
    " ",
    "\r\n",
    "\u0085\u2028\u2029",
    "x" * 100_000,
    "../../etc/passwd",
    "%00%ff",
    "\\",
    '"',
    "'; DROP TABLE requests; --",
    "{{7*7}}${7*7}",
    "64x64\x00",
    "٦٤x٦٤",
    "１０２４x１０２４",
]
INVALID_UTF8 = [Raw(b'"\xff\xfe"'), Raw(b'"\xed\xa0\x80"'), Raw(b'"\xc0\xaf"'), Raw(b'"a\x80"')]
NUMBERS = [
    Raw(b"1e308"),
    1e308,
    Raw(b"1e400"),
    Raw(b"-1e400"),
    Raw(b"NaN"),
    Raw(b"Infinity"),
    Raw(b"-Infinity"),
    2**63,
    2**64,
    2**63 - 1,
    -(2**63) - 1,
    Raw(b"-0"),
    Raw(b"-0.0"),
    Raw(b"1" * 5000),
    5e-324,
    0,
    -1,
    1.5,
]
DEEP = [Raw(b"[" * 1000 + b"]" * 1000), Raw(b'{"a":' * 1000 + b"null" + b"}" * 1000), Raw(b"[" * 100 + b"]" * 100)]
WRONG_TYPES = [None, True, False, 0, "", [], {}, [None], {"": None}, "true", "null", [[[]]]]
URLS = [
    "http://[::1/",
    "http://[fe80::1%25eth0]/",
    "http://[fe80::1%eth0]/",
    "http://[::1]:99999/",
    "http://[::1]]/",
    "http://[]/",
    "http://127.0.0.1:0/",
    "http://127.0.0.1:9/x.png",
    "http://[::1]/x.png",
    "https://[::]/",
    "http://user:pass@127.0.0.1/",
    "http:///x",
    "http://",
    "https:",
    "javascript:alert(1)",
    "data:image/png;base64,!!!",
    "data:image/png;base64,",
    "data:,",
    "data:image/png,notbase64",
    "data:image/png;base64," + "A" * 5,
    "data:;base64,iVBORw0KGgo=",
    "file:///etc/passwd",
    "ftp://127.0.0.1/",
    "http://127.0.0.1/" + "a" * 100_000,
    DATA_URL.replace("iVBOR", "iV\x00BOR"),
    f"{OWN}/v1/files/\ud800",
    f"{OWN}/v1/files/",
    f"{OWN}/v1/files/nope/download",
    f"{OWN}/v1/blobs/x.png",
    f"{OWN}/v1/blobs/../secret.key?exp=1&sig=x",
    f"{OWN}/v1/blobs/a?exp=99999999999999999999&sig=",
    f"{OWN}/v1/blobs/noext?exp=NaN&sig=\ud800",
]
UNKNOWN_KEYS = ["self", "key_id", "__proto__", "constructor", "", "\ud800", "\x00", "a" * 1000, "extra", "model\x00"]

texts = st.one_of(
    st.sampled_from(TEXTS),
    st.text(max_size=30),
    st.sampled_from(["\x00", "a\x00b", "\ud800"]),  # their own branch: drawn often
    st.text(st.characters(exclude_categories=()), max_size=12),
)  # surrogates too
urls = st.one_of(st.sampled_from(URLS), texts)
values = st.one_of(
    texts, urls, st.sampled_from(INVALID_UTF8 + NUMBERS + DEEP + WRONG_TYPES), st.integers(), st.floats()
)


def fields(known: list[str], value: st.SearchStrategy[Any] = values, max_size: int = 3) -> st.SearchStrategy[dict]:
    """Overrides for a body: some of its fields (or unknown ones) set to hostile values."""
    return st.dictionaries(st.sampled_from(known + UNKNOWN_KEYS), value, min_size=1, max_size=max_size)


# Whole bodies: not an object, not JSON, not UTF-8, too deep, empty.
WHOLE_BODIES = [
    b"",
    b"null",
    b"[]",
    b'"x"',
    b"1e400",
    b"NaN",
    b"-Infinity",
    b"{",
    b"{]",
    b"\xff\xfe",
    b"\xef\xbb\xbf{}",
    b'{"prompt": "\xed\xa0\x80"}',
    b'{"prompt": "x",}',
    b'{"prompt": "x"} trailing',
    b"[" * 1000 + b"]" * 1000,
    b'{"a":' * 1000 + b"1" + b"}" * 1000,
    b'{"a": [' + b"[" * 5000 + b"]" * 5000 + b"]}",
    b"\x00",
    b'{"prompt": "x", "prompt": "\\ud800"}',
    b"{" + b'"k":0,' * 20_000 + b'"z":0}',
    b"[" + b"0," * 200_000 + b"0]",
]

# -- the gateway ------------------------------------------------------------------------------------


@dataclass
class Target:
    url: str
    http: httpx.Client

    def send(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str | None = None,
        query: str = "",
        headers: dict[str, str | bytes] | None = None,
    ) -> httpx.Response:
        """Send one request and check what every answer must be (see the module docstring)."""
        if body is not None:
            body = body.replace(OWN.encode(), self.url.encode())
            _local_only(body)
        all_headers = {k: v.encode("latin-1") if isinstance(v, str) else v for k, v in (headers or {}).items()}
        if content_type is not None:
            all_headers["content-type"] = content_type.encode("latin-1")
        target = httpx.URL(self.url + path + (f"?{query}" if query else ""))
        shown = f"{method} {path}{'?' + query if query else ''} {_short(body)} headers={all_headers!r}"
        resp = self.http.request(method, target, content=body, headers=all_headers)
        answered(resp, shown)
        health = self.http.get("/health")
        assert health.status_code == 200, f"after {shown}: /health answered {health.status_code}"
        return resp


def answered(resp: httpx.Response, request: str) -> None:
    status = resp.status_code
    assert status < 500, f"{request}\n-> {status} {resp.text[:400]}"
    if status >= 400:
        try:
            body = resp.json()
        except ValueError:
            raise AssertionError(f"{request}\n-> {status} with a body that is not JSON: {resp.text[:300]!r}") from None
        err = body.get("error") if isinstance(body, dict) else None
        assert isinstance(err, dict) and {"message", "type", "param", "code"} <= set(err), (
            f"{request}\n-> {status} outside the OpenAI envelope: {resp.text[:300]}"
        )
        assert isinstance(err["message"], str) and err["message"].strip(), f"{request}\n-> {status}: empty message"
    elif not resp.headers.get("content-type", "").startswith("text/event-stream"):
        resp.json()  # a success is JSON too (the routes tested here answer nothing else)


_URL = re.compile(rb"(?i)https?://([^/?#\"\\\s]*)")
# The only hosts the suite names: loopback and link-local literals, well- and malformed.
_LOCAL_HOST = re.compile(rb"127\.0\.0\.1(:\d*)?|\[(::1?|fe80::1%(25)?eth0)?\]{0,2}(:\d*)?")


def _local_only(body: bytes) -> None:
    """Refuse to send a body naming any other host: the gateway would look it up or connect to it, and
    the suite reaches nothing beyond this machine."""
    for m in _URL.finditer(body):
        host = m.group(1).rsplit(b"@", 1)[-1]
        if host and not _LOCAL_HOST.fullmatch(host):
            raise AssertionError(f"the suite must not name a host beyond loopback: {m.group(0)[:80]!r}")


def _short(body: bytes | None) -> str:
    if body is None:
        return ""
    return repr(body[:300]) + (f"... ({len(body)} bytes)" if len(body) > 300 else "")


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> Iterator[Target]:
    # Both databases: PostgreSQL refuses what SQLite stores (NUL in text), so each finds its own 500s.
    # An admin key: the admin routes work, and keys created by the tests never lock the suite out.
    data = tmp_path_factory.mktemp("hostile")
    config = Settings(data_dir=data, database_url=database_url, admin_key=ADMIN)
    with (
        running_server(config) as url,
        httpx.Client(base_url=url, timeout=60, headers={"authorization": f"Bearer {ADMIN}"}) as http,
    ):
        yield Target(url, http)


@pytest.fixture(scope="module")
def key_id(gw: Target) -> str:
    resp = gw.send("POST", "/v1/admin/keys", encode({"name": "hostile-suite"}), "application/json")
    return resp.json()["id"]


# -- what may really run --------------------------------------------------------------------------

SMALL = {"size": "64x64", "num_inference_steps": 1}


def small(body: Any, steps_key: str = "num_inference_steps") -> bool:
    """Whether a request, were it valid, generates one 64x64 image at one or two steps."""
    return (
        isinstance(body, dict)
        and body.get("size") in ("64x64", b"64x64")
        and body.get(steps_key) in (1, 2, b"1", b"2")
        and body.get("n", 1) in (1, b"1")
        and body.get("num_outputs", 1) in (1, b"1")
        and not body.get("stream")
    )


def dry(body: Any, forced: bool) -> str:
    """`dryRun=true` unless the request is small (and the example did not ask for a dry run anyway)."""
    return "" if small(body) and not forced else "dryRun=true"


# -- the properties -------------------------------------------------------------------------------

IMAGE_FIELDS = [
    "model",
    "prompt",
    "n",
    "size",
    "aspect_ratio",
    "resolution",
    "seed",
    "response_format",
    "output_format",
    "output_compression",
    "cfg_scale",
    "guidance",
    "num_inference_steps",
    "steps",
    "user",
    "partial_images",
    "images",
    "negative_prompt",
    "true_cfg_scale",
    "loras",
    "previous_response_id",
    "mask",
]


@given(overrides=fields(IMAGE_FIELDS), dry_run=st.booleans())
@few(40)
def test_generations_json(gw: Target, overrides: dict[str, Any], dry_run: bool) -> None:
    body = {"model": "kontext-tiny", "prompt": "a fox", **SMALL, **overrides}
    gw.send("POST", "/v1/images/generations", encode(body), "application/json", dry(body, dry_run))


image_refs = st.one_of(
    st.lists(st.fixed_dictionaries({"image_url": urls}), min_size=1, max_size=2),
    st.lists(st.dictionaries(st.sampled_from(["image_url", "file_id", *UNKNOWN_KEYS]), values, max_size=2), max_size=2),
    st.sampled_from(WRONG_TYPES + DEEP + NUMBERS),
)
masks = st.one_of(st.fixed_dictionaries({"image_url": urls}), st.sampled_from(WRONG_TYPES + DEEP), urls)


@given(
    images=image_refs,
    mask=st.none() | masks,
    overrides=st.none() | fields(IMAGE_FIELDS, max_size=2),
    dry_run=st.booleans(),
)
@few(40)
def test_edits_json(gw: Target, images: Any, mask: Any, overrides: dict[str, Any] | None, dry_run: bool) -> None:
    body: dict[str, Any] = {"model": "kontext-tiny", "prompt": "make it night", **SMALL, "images": images}
    if mask is not None:
        body["mask"] = mask
    body.update(overrides or {})
    gw.send("POST", "/v1/images/edits", encode(body), "application/json", dry(body, dry_run))


field_bytes = st.one_of(
    texts.map(utf8),
    st.sampled_from(
        [
            b"\xff\xfe",
            b"\xed\xa0\x80",
            b"\xc0\xaf",
            b"1e400",
            b"NaN",
            b"Infinity",
            b"-0",
            str(2**64).encode(),
            b"",
            b"true",
            b"null",
            b"[]",
            b"{}",
            b"x" * 100_000,
            b"64x64\x00",
            b"1\r\n\r\n--" + BOUNDARY,
        ]
    ),
)
part_names = st.one_of(
    st.sampled_from(
        [
            b"image",
            b"image[]",
            b"image[0]",
            b"image[99999999999999999999]",
            b"mask",
            b"prompt",
            b"model",
            b"size",
            b"n",
            b"stream",
            b"images",
            b"loras",
        ]
    ),
    texts.map(utf8),
)
file_parts = st.builds(
    Part,
    name=part_names,
    data=st.sampled_from(IMAGE_BYTES),
    filename=st.one_of(st.just(b"a.png"), texts.map(utf8), st.just(b"../../../etc/x.png")),
    content_type=st.sampled_from([None, b"image/png", b"text/plain", b"\xff", b'image/png; x="y']),
)
text_parts = st.builds(Part, name=part_names, data=field_bytes)


@given(
    image=st.sampled_from(IMAGE_BYTES),
    form_fields=st.dictionaries(
        st.sampled_from(
            [
                b"model",
                b"prompt",
                b"n",
                b"size",
                b"num_inference_steps",
                b"seed",
                b"output_format",
                b"cfg_scale",
                b"response_format",
                b"negative_prompt",
            ]
        ),
        field_bytes,
        max_size=3,
    ),
    extra=st.lists(st.one_of(file_parts, text_parts), max_size=3),
    dry_run=st.booleans(),
)
@few(40)
def test_edits_multipart(
    gw: Target, image: bytes, form_fields: dict[bytes, bytes], extra: list[Part], dry_run: bool
) -> None:
    form = {
        b"model": b"kontext-tiny",
        b"prompt": b"make it night",
        b"size": b"64x64",
        b"num_inference_steps": b"1",
        **form_fields,
    }
    parts = [Part(b"image", image, b"a.png", b"image/png"), *(Part(k, v) for k, v in form.items()), *extra]
    runs = small({k.decode(): v for k, v in form.items()}) and not any(p.name in form for p in extra)
    gw.send("POST", "/v1/images/edits", multipart(parts), MULTIPART, "" if runs and not dry_run else "dryRun=true")


MALFORMED_MULTIPART = [
    b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx',  # never closed
    b"--" + BOUNDARY + b"\r\n\r\nno headers\r\n--" + BOUNDARY + b"--\r\n",
    b"--" + BOUNDARY + b"\r\nContent-Disposition: form-data\r\n\r\nno name\r\n--" + BOUNDARY + b"--\r\n",
    b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n' + PNG,
    b'--other\r\nContent-Disposition: form-data; name="x"\r\n\r\ny\r\n--other--\r\n',
    b"",
    b"\xff" * 100,
    b"--" + BOUNDARY + b"--\r\n",
    (b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="f"\r\n\r\nv\r\n') * 300 + b"--" + BOUNDARY + b"--",
]


@given(
    body=st.sampled_from(MALFORMED_MULTIPART),
    path=st.sampled_from(["/v1/images/edits", "/v1/files"]),
    content_type=st.sampled_from(
        [
            MULTIPART,
            "multipart/form-data",
            "multipart/form-data; boundary=",
            'multipart/form-data; boundary="unterminated',
            "multipart/mixed; boundary=x",
            "application/x-www-form-urlencoded",
            "text/plain",
            "application/json",
        ]
    ),
)
@few(30)
def test_malformed_multipart(gw: Target, body: bytes, path: str, content_type: str) -> None:
    gw.send("POST", path, body, content_type, "dryRun=true")


PREDICTION_FIELDS = ["model", "version", "input", "webhook", "webhook_events_filter"]
INPUT_FIELDS = [
    "prompt",
    "input_image",
    "input_images",
    "image",
    "image_url",
    "images",
    "image_urls",
    "input_image_1",
    "input_image_99999999999999999999",
    "aspect_ratio",
    "size",
    "resolution",
    "output_format",
    "output_quality",
    "num_outputs",
    "num_inference_steps",
    "guidance",
    "seed",
]
image_inputs = st.one_of(urls, st.lists(st.one_of(urls, st.fixed_dictionaries({"image_url": urls})), max_size=2))
input_values = st.one_of(values, image_inputs)


@given(
    top=st.none() | fields(PREDICTION_FIELDS, st.one_of(values, st.lists(texts, max_size=2)), max_size=2),
    inputs=st.none() | fields(INPUT_FIELDS, input_values),
    by_path=st.booleans(),
    dry_run=st.booleans(),
)
@few(40)
def test_predictions(
    gw: Target, top: dict[str, Any] | None, inputs: dict[str, Any] | None, by_path: bool, dry_run: bool
) -> None:
    body: dict[str, Any] = {"input": {"prompt": "a fox", **SMALL, **(inputs or {})}}
    path = f"/v1/models/{TINY}/predictions" if by_path else "/v1/predictions"
    if not by_path:
        body["model"] = TINY
    body.update(top or {})
    query = dry(body.get("input"), dry_run)
    wait = {} if query else {"prefer": "wait=30"}
    resp = gw.send("POST", path, encode(body), "application/json", query, headers=wait)
    if resp.status_code == 201:
        ended_without_server_error(gw, resp.json()["id"])


def ended_without_server_error(gw: Target, rid: str) -> None:
    """A prediction is accepted (201) before it runs: a server error in its job shows only in its record."""
    record = gw.send("GET", f"/v1/requests/{rid}").json()
    error = record.get("error") or {}
    assert record["status"] != "failed" or error.get("type") != "server_error", f"prediction {rid} failed: {error}"


path_segments = st.one_of(
    st.sampled_from(["%ED%A0%80", "%00", "%FF", "%2F", "a" * 4000, "%25", "kontext-tiny", "x%0Ay", "%C0%AF"]),
    texts.map(lambda t: quote_from_bytes(utf8(t)[:1000], safe="")).filter(bool),
)


@given(owner=path_segments, name=path_segments)
@few(15)
def test_prediction_model_path(gw: Target, owner: str, name: str) -> None:
    body = encode({"input": {"prompt": "a fox", **SMALL}})
    gw.send("POST", f"/v1/models/{owner}/{name}/predictions", body, "application/json", "dryRun=true")


@given(
    content=st.sampled_from(IMAGE_BYTES),
    metadata=st.none() | st.one_of(st.sampled_from(WHOLE_BODIES), values.map(encode), field_bytes),
    filename=st.one_of(st.just(b"a.png"), texts.map(utf8), st.sampled_from([b"", b"\x00", b"a" * 10_000])),
    extra=st.lists(st.one_of(file_parts, text_parts), max_size=2),
)
@few(30)
def test_files_multipart(
    gw: Target, content: bytes, metadata: bytes | None, filename: bytes, extra: list[Part]
) -> None:
    parts = [Part(b"content", content, filename, b"image/png")]
    if metadata is not None:
        parts.append(Part(b"metadata", metadata))
    gw.send("POST", "/v1/files", multipart(parts + extra), MULTIPART)


KEY_FIELDS = ["name", "admin", "models", "budget_usd", "budget_period", "rpm", "ipm", "max_concurrent"]


@given(overrides=fields(KEY_FIELDS))
@few(30)
def test_admin_key_create(gw: Target, overrides: dict[str, Any]) -> None:
    gw.send("POST", "/v1/admin/keys", encode({"name": "hostile", **overrides}), "application/json")


@given(overrides=fields(KEY_FIELDS), hostile_id=st.none() | path_segments)
@few(30)
def test_admin_key_update(gw: Target, key_id: str, overrides: dict[str, Any], hostile_id: str | None) -> None:
    gw.send("PATCH", f"/v1/admin/keys/{hostile_id or key_id}", encode(overrides), "application/json")


JSON_ROUTES = [
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/predictions",
    f"/v1/models/{TINY}/predictions",
    "/v1/admin/keys",
    "/v1/admin/keys/{key}",
]


@given(
    path=st.sampled_from(JSON_ROUTES),
    body=st.one_of(st.sampled_from(WHOLE_BODIES), values.map(encode)),
    content_type=st.sampled_from(
        [
            "application/json",
            "application/json; charset=latin-1",
            "application/x+json",
            "text/plain",
            "APPLICATION/JSON",
            "application/json; charset=\xff",
        ]
    ),
)
@few(40)
def test_whole_bodies(gw: Target, key_id: str, path: str, body: bytes, content_type: str) -> None:
    gw.send("PATCH" if "{key}" in path else "POST", path.replace("{key}", key_id), body, content_type, "dryRun=true")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


CURSOR_JSON = [
    b"[" * 1000 + b"]" * 1000,
    b'{"a":' * 1000 + b"1" + b"}" * 1000,
    encode(["\ud800", "x"]),
    encode(["2024-01-01T00:00:00", "\ud800"]),
    b'[NaN, "x"]',
    b'[1e400, "x"]',
    b'["9999-12-31T23:59:59.999999+14:00", "x"]',
    b'["0001-01-01T00:00:00-14:00", "x"]',
    b'{"a": 1}',
    b'"x"',
    b"null",
    b"[]",
    b"[1, 2, 3]",
    b"\xff\xfe",
    b'["2024-01-01T00:00:00", ' + b"[" * 1000 + b"]" * 1000 + b"]",
    b'["2024-01-01T00:00:00\\u0000", "x"]',
    b'[["x"], "y"]',
    b'["2024-13-45T99:99:99", "x"]',
    b'["2024-01-01T00:00:00", ' + str(2**64).encode() + b"]",
]
cursors = st.one_of(
    st.sampled_from([b64(c) for c in CURSOR_JSON]),
    st.sampled_from(["!!!", "=", "====", "%00", "%ED%A0%80", "a" * 8000, "", "%FF%FE"]),
    st.binary(max_size=40).map(b64),
)
query_values = st.one_of(
    st.sampled_from(
        [
            "1e400",
            "NaN",
            "Infinity",
            "-Infinity",
            "-0",
            str(2**63),
            str(2**64),
            "-1",
            "0",
            "1e308",
            "0x10",
            "1_000",
            " 5",
            "٣",
            "9" * 5000,
            "0000-00-00",
            "9999-12-31T23:59:59+99:00",
            "2024-02-30",
            "-99999999999999999999",
            "1e-400",
            "5e-324",
        ]
    ),
    texts.map(lambda t: quote_from_bytes(utf8(t)[:2000], safe="")),
    st.sampled_from(["%ED%A0%80", "%FF", "%00", "a%00b", "%C0%AF"]),
)
LISTINGS = {
    "/v1/predictions": ["cursor", "limit"],
    "/v1/requests": ["key_id", "model", "provider", "status", "created_after", "created_before", "limit", "cursor"],
    "/v1/usage": ["key_id", "model", "provider", "start", "end", "group_by"],
    "/v1/models/kontext-tiny/stats": ["days"],
    "/v1/admin/keys": ["include_revoked"],
}


@given(path=st.sampled_from(sorted(LISTINGS)), data=st.data())
@few(60)
def test_listing_queries(gw: Target, path: str, data: st.DataObject) -> None:
    names = LISTINGS[path]
    params = data.draw(
        st.dictionaries(st.sampled_from(names), st.one_of(query_values, cursors), min_size=1, max_size=3)
    )
    if "cursor" in names:
        params["cursor"] = data.draw(cursors)
    gw.send("GET", path, query="&".join(f"{k}={v}" for k, v in params.items()))


@given(model=path_segments, days=st.none() | query_values)
@few(15)
def test_model_stats_path(gw: Target, model: str, days: str | None) -> None:
    gw.send("GET", f"/v1/models/{model}/stats", query=f"days={days}" if days is not None else "")


header_values = st.one_of(
    st.sampled_from(
        [
            "",
            "x" * 300,
            "x" * 10_000,
            "wait",
            "wait=0",
            "wait=61",
            "wait=99999999999999999999",
            "wait=-1",
            "wait=1e400",
            "wait=NaN",
            "respond-async, wait=1",
            "local",
            "LOCAL",
            "replicate",
            "nope",
        ]
    ),
    # What a client can send: latin-1 without surrounding whitespace (h11 refuses
    # it), nor DEL, which uvicorn's parser answers itself before the app sees it.
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=30),
)


@given(
    headers=st.dictionaries(
        st.sampled_from(["idempotency-key", "x-provider", "prefer"]), header_values, min_size=1, max_size=3
    ),
    path=st.sampled_from(["/v1/images/generations", "/v1/predictions"]),
)
@few(30)
def test_headers(gw: Target, headers: dict[str, str], path: str) -> None:
    body = {"model": "kontext-tiny", "prompt": "a fox", **SMALL}
    if path == "/v1/predictions":
        body = {"model": TINY, "input": {"prompt": "a fox", **SMALL}}
    gw.send("POST", path, encode(body), "application/json", headers=dict(headers))


# -- regressions: each input that once took the server down, pinned as its own test -------------------

REGRESSIONS: list[tuple[str, str, str, bytes | None, str]] = [
    # (id, method, path, body: JSON or multipart, query)
    ("surrogate-model", "POST", "/v1/images/generations", encode({"model": "\ud800", "prompt": "x", **SMALL}), ""),
    ("surrogate-size", "POST", "/v1/images/generations", encode({"prompt": "x", "size": "\ud800"}), ""),
    ("surrogate-prompt", "POST", "/v1/images/generations", encode({"prompt": "\ud800", **SMALL}), ""),
    (
        "surrogate-prediction-prompt",
        "POST",
        "/v1/predictions",
        encode({"model": TINY, "input": {"prompt": "\ud800", **SMALL}}),
        "",
    ),
    (
        "surrogate-prediction-model",
        "POST",
        "/v1/predictions",
        encode({"model": "\ud800", "input": {"prompt": "x"}}),
        "",
    ),
    (
        "surrogate-prediction-webhook",
        "POST",
        "/v1/predictions",
        encode({"model": TINY, "webhook": "http://\ud800/", "input": {"prompt": "x", **SMALL}}),
        "",
    ),
    ("surrogate-key-name", "POST", "/v1/admin/keys", encode({"name": "\ud800"}), ""),
    ("deep-body", "POST", "/v1/images/generations", b"[" * 1000 + b"]" * 1000, ""),
    ("deep-object-body", "POST", "/v1/predictions", b'{"a":' * 1000 + b"1" + b"}" * 1000, ""),
    ("deep-cursor-predictions", "GET", "/v1/predictions", None, "cursor=" + b64(b"[" * 1000 + b"]" * 1000)),
    ("deep-cursor-requests", "GET", "/v1/requests", None, "cursor=" + b64(b"[" * 1000 + b"]" * 1000)),
    (
        "ipv6-input-image",
        "POST",
        "/v1/predictions",
        encode({"model": TINY, "input": {"prompt": "x", "input_image": "http://[::1/", **SMALL}}),
        "dryRun=true",
    ),
    (
        "ipv6-image-url",
        "POST",
        "/v1/images/edits",
        encode({"prompt": "x", "images": [{"image_url": "http://[::1/"}], **SMALL}),
        "dryRun=true",
    ),
    (
        "ipv6-mask-url",
        "POST",
        "/v1/images/edits",
        encode({"prompt": "x", "images": [{"image_url": DATA_URL}], "mask": {"image_url": "http://[::1/"}, **SMALL}),
        "dryRun=true",
    ),
    ("budget-1e308", "POST", "/v1/admin/keys", encode({"name": "b", "budget_usd": 1e308}), ""),
    ("budget-infinity", "POST", "/v1/admin/keys", encode({"name": "b", "budget_usd": Raw(b"Infinity")}), ""),
    ("budget-nan", "POST", "/v1/admin/keys", encode({"name": "b", "budget_usd": Raw(b"NaN")}), ""),
    ("rpm-2^63", "POST", "/v1/admin/keys", encode({"name": "b", "rpm": 2**63}), ""),
    ("max-concurrent-2^64", "POST", "/v1/admin/keys", encode({"name": "b", "max_concurrent": 2**64}), ""),
    ("update-key-id-field", "PATCH", "/v1/admin/keys/{key}", encode({"key_id": "x"}), ""),
    ("create-self-field", "POST", "/v1/admin/keys", encode({"name": "b", "self": 1}), ""),
    # NUL: PostgreSQL stores no U+0000 in text or JSON, nor compares with it.
    ("nul-prompt", "POST", "/v1/images/generations", encode({"prompt": "a\x00b", **SMALL}), ""),
    ("nul-model", "POST", "/v1/images/generations", encode({"model": "kontext\x00", "prompt": "x"}), ""),
    ("nul-field-name", "POST", "/v1/images/generations", encode({"prompt": "x", "extra\x00": 1, **SMALL}), ""),
    (
        "nul-prediction-prompt",
        "POST",
        "/v1/predictions",
        encode({"model": TINY, "input": {"prompt": "\x00", **SMALL}}),
        "",
    ),
    (
        "nul-edit-form-prompt",
        "POST",
        "/v1/images/edits",
        multipart(
            [
                Part(b"image", PNG, b"a.png", b"image/png"),
                Part(b"prompt", b"a\x00b"),
                Part(b"size", b"64x64"),
                Part(b"num_inference_steps", b"1"),
            ]
        ),
        "",
    ),
    ("nul-file-name", "POST", "/v1/files", multipart([Part(b"content", PNG, b"a\x00.png", b"image/png")]), ""),
    (
        "nul-file-metadata",
        "POST",
        "/v1/files",
        multipart([Part(b"content", PNG, b"a.png", b"image/png"), Part(b"metadata", b'{"a": "\\u0000"}')]),
        "",
    ),
    ("nul-requests-query", "GET", "/v1/requests", None, "model=%00&key_id=%00&provider=%00"),
    ("nul-usage-query", "GET", "/v1/usage", None, "model=%00&key_id=%00"),
    ("nul-request-id", "GET", "/v1/requests/%00", None, ""),
    ("nul-prediction-id", "GET", "/v1/predictions/%00", None, ""),
    ("nul-file-id", "GET", "/v1/files/%00", None, ""),
    ("nul-key-id", "PATCH", "/v1/admin/keys/%00", b"{}", ""),
]


@pytest.mark.parametrize("method,path,body,query", [pytest.param(*r[1:], id=r[0]) for r in REGRESSIONS])
def test_regression(gw: Target, key_id: str, method: str, path: str, body: bytes | None, query: str) -> None:
    kind = None if body is None else MULTIPART if body.startswith(b"--" + BOUNDARY) else "application/json"
    gw.send(method, path.replace("{key}", key_id), body, kind, query)
