"""Bad input gets the OpenAI error envelope with the right status: never a 500, never an empty 200."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI
from PIL import Image

from conftest import png_bytes, running_server
from kontext_gateway.catalog import DEFAULT_CATALOG
from kontext_gateway.config import Settings


def assert_error(resp: httpx.Response, status: int, code: str | None, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    err = body["error"]
    assert err["message"] and isinstance(err["message"], str)
    assert err["type"] == ("invalid_request_error" if status < 500 else "server_error")
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


def gen(http: httpx.Client, **body) -> httpx.Response:
    return http.post("/v1/images/generations", json={"model": "kontext-tiny", "size": "64x64", **body})


def edit(http: httpx.Client, files, **data) -> httpx.Response:
    return http.post("/v1/images/edits", files=files, data={"model": "kontext-tiny", "size": "64x64", **data})


def one(data: bytes, name: str = "a.png") -> list:
    return [("image", (name, data, "image/png"))]


@pytest.mark.parametrize(
    "body,code,param",
    [
        ({}, "missing_required_parameter", "prompt"),
        ({"prompt": ""}, "invalid_value", "prompt"),
        ({"prompt": "   "}, "invalid_value", "prompt"),
        ({"prompt": 12}, "invalid_type", "prompt"),
        ({"prompt": "x", "n": 0}, "integer_out_of_range", "n"),
        ({"prompt": "x", "n": 11}, "integer_out_of_range", "n"),
        ({"prompt": "x", "n": "many"}, "invalid_type", "n"),
        ({"prompt": "x", "size": "huge"}, "invalid_size", "size"),
        ({"prompt": "x", "size": "4096x4096"}, "invalid_size", "size"),
        ({"prompt": "x", "size": "0x64"}, "invalid_size", "size"),
        ({"prompt": "x", "size": "20000x1"}, "invalid_size", "size"),
        ({"prompt": "x", "size": None, "aspect_ratio": "wide"}, "invalid_aspect_ratio", "aspect_ratio"),
        ({"prompt": "x", "size": None, "resolution": "8X"}, "invalid_resolution", "resolution"),
        ({"prompt": "x", "output_format": "bmp"}, "invalid_value", "output_format"),
        ({"prompt": "x", "response_format": "binary"}, "invalid_value", "response_format"),
        ({"prompt": "x", "output_compression": 101}, "integer_out_of_range", "output_compression"),
        ({"prompt": "x", "seed": -1}, "integer_out_of_range", "seed"),
        ({"prompt": "x", "num_inference_steps": 0}, "integer_out_of_range", "num_inference_steps"),
        ({"prompt": "x", "stream": True, "partial_images": 4}, "integer_out_of_range", "partial_images"),
    ],
)
def test_generation_validation(http: httpx.Client, body: dict, code: str, param: str) -> None:
    assert_error(gen(http, **body), 400, code, param)


def test_unknown_model_404_with_did_you_mean(http: httpx.Client, client: OpenAI) -> None:
    err = assert_error(gen(http, prompt="x", model="flux-kontext-maxx"), 404, "model_not_found", "model")
    assert "Did you mean 'flux.1-kontext-max'?" in err["message"]
    with pytest.raises(openai.NotFoundError) as exc:
        client.images.generate(model="dall-e-3", prompt="x")
    assert exc.value.body["code"] == "model_not_found"


def test_model_without_provider_is_503_with_reason(http: httpx.Client) -> None:
    resp = gen(http, prompt="x", model="flux.1-kontext-pro")
    err = assert_error(resp, 503, "provider_unavailable")
    assert "flux.1-kontext-pro" in err["message"] and "REPLICATE_API_TOKEN is not set" in err["message"]
    assert resp.headers["x-should-retry"] == "false"  # configuration does not change between retries
    err = assert_error(gen(http, prompt="x", model="flux.1-kontext-dev"), 503, "provider_unavailable")
    assert "KONTEXT_DEV_WEIGHTS_DIR" in err["message"]
    # Every route of the model is named with its reason: the hosted [dev] routes only edit.
    assert "replicate/flux.1-kontext-dev: edits only" in err["message"]
    assert "fal/flux.1-kontext-dev-lora: edits only" in err["message"]


def test_unknown_forced_provider(http: httpx.Client) -> None:
    resp = http.post(
        "/v1/images/generations", json={"model": "kontext-tiny", "prompt": "x"}, headers={"x-provider": "replicate"}
    )
    assert_error(resp, 400, "provider_not_found", "x-provider")


def test_invalid_json(http: httpx.Client) -> None:
    resp = http.post("/v1/images/generations", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(resp, 400, "invalid_json")
    resp = http.post("/v1/images/generations", json=["a list"])
    assert_error(resp, 400, "invalid_json")


def test_edit_without_image(http: httpx.Client, client: OpenAI) -> None:
    resp = http.post(
        "/v1/images/edits",
        data={"model": "kontext-tiny", "prompt": "x"},
        files={"unused": ("", b"", "application/octet-stream")},
    )
    assert resp.status_code == 400
    resp = http.post("/v1/images/edits", json={"model": "kontext-tiny", "prompt": "x"})
    assert_error(resp, 400, "missing_required_parameter", "image")


def test_edit_with_too_many_images(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.images.edit(
            model="kontext-tiny", prompt="x", image=[(f"{i}.png", png_bytes(32, 32)) for i in range(5)]
        )  # the limit is 4
    assert exc.value.status_code == 400 and exc.value.body["code"] == "too_many_images"
    assert exc.value.body["param"] == "image"


def test_edit_without_prompt(http: httpx.Client) -> None:
    resp = http.post("/v1/images/edits", files=one(png_bytes(32, 32)), data={"model": "kontext-tiny"})
    assert_error(resp, 400, "missing_required_parameter", "prompt")


def test_wrong_content_type_for_edit(http: httpx.Client) -> None:
    resp = http.post("/v1/images/edits", content=b"prompt=x", headers={"content-type": "text/plain"})
    assert_error(resp, 415, "unsupported_media_type")


def test_a_mask_of_another_size_is_rejected(http: httpx.Client) -> None:
    files = [*one(png_bytes(32, 32)), ("mask", ("m.png", png_bytes(32, 16), "image/png"))]
    assert_error(edit(http, files, prompt="x"), 400, "invalid_mask", "mask")


def _png_with_header_size(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR claims width x height (a decompression-bomb shaped header)."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


@pytest.mark.parametrize(
    "payload,code",
    [
        (b"this is not an image", "unsupported_image_format"),
        (b"", "unsupported_image_format"),
        (png_bytes(64, 64)[:200], "invalid_image"),
        (png_bytes(64, 64, fmt="JPEG")[:300], "invalid_image"),
        (png_bytes(32, 32, fmt="BMP"), "unsupported_image_format"),
        (_png_with_header_size(30000, 30000), "image_too_large"),
    ],
)
def test_unreadable_truncated_and_bomb_images(http: httpx.Client, payload: bytes, code: str) -> None:
    assert_error(edit(http, one(payload), prompt="x"), 400, code, "image")


def test_bad_data_url(http: httpx.Client) -> None:
    resp = http.post(
        "/v1/images/edits",
        json={"model": "kontext-tiny", "prompt": "x", "images": [{"image_url": "data:image/png;base64,@@@"}]},
    )
    assert_error(resp, 400, "invalid_image_url")
    resp = http.post(
        "/v1/images/edits",
        json={"model": "kontext-tiny", "prompt": "x", "images": [{"image_url": "ftp://example.com/a.png"}]},
    )
    assert_error(resp, 400, "invalid_image_url")
    resp = http.post("/v1/images/edits", json={"model": "kontext-tiny", "prompt": "x", "images": "not a list"})
    assert_error(resp, 400, "invalid_type", "images")


def test_file_over_50_mb(http: httpx.Client) -> None:
    big = png_bytes(16, 16) + b"\0" * (50 * 1024 * 1024)  # a valid PNG header, 50 MB of trailing bytes
    assert_error(edit(http, one(big), prompt="x"), 413, "file_too_large", "image")
    data_url = "data:image/png;base64," + base64.b64encode(big).decode()
    resp = http.post(
        "/v1/images/edits", json={"model": "kontext-tiny", "prompt": "x", "images": [{"image_url": data_url}]}
    )
    assert_error(resp, 413, "file_too_large", "image")


def test_unknown_route_and_method(http: httpx.Client) -> None:
    assert_error(http.get("/v1/nothing-here"), 404, "not_found")
    assert_error(http.get("/v1/images/generations"), 405, "method_not_allowed")
    assert_error(http.get("/v1/blobs/" + "0" * 64 + ".png"), 403, "invalid_signature")


def test_errors_carry_request_id_and_are_recorded(http: httpx.Client, base_url: str) -> None:
    resp = gen(http, prompt="")
    assert resp.headers.get("x-request-id", "").startswith("req_")
    assert resp.headers.get("x-should-retry") == "false"


def test_nothing_stored_is_lost_after_errors(http: httpx.Client) -> None:
    ok = gen(http, prompt="keep me", response_format="url")
    url = ok.json()["data"][0]["url"]
    for body in ({"prompt": ""}, {"prompt": "x", "size": "nope"}, {"prompt": "x", "model": "nope"}):
        gen(http, **body)
    edit(http, one(b"garbage"), prompt="x")
    again = httpx.get(url)
    assert again.status_code == 200 and again.content[:8] == b"\x89PNG\r\n\x1a\n"


# -- servers configured differently --------------------------------------------------------------------

EDIT_ONLY = """
[[models]]
id = "edit-only"
name = "Edit only"
creator = "Test"
owned_by = "test"
family = "flux.1-kontext"
status = "active"
released = 2025-01-01
description = "A model that only edits."
modes = ["edit"]
input_modalities = ["text", "image"]
output_modalities = ["image"]
max_resolution = "1024x1024"
max_input_images = 1
aspect_ratios = ["1:1", "4:1", "8:1"]
resolutions = ["1K"]
default_steps = 2

[[models.providers]]
provider = "local"
config_key = "local/edit-only"
provider_model_id = "kontext-tiny"
[models.providers.pricing]
source = "self-hosted"
components = [{ type = "output", metric = "image", unit_price = 0.01 }]
"""


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    d: Path = tmp_path_factory.mktemp("small")
    catalog = d / "models.toml"
    catalog.write_text(DEFAULT_CATALOG.read_text() + EDIT_ONLY)
    settings = Settings(data_dir=d, max_body_bytes=1024 * 1024, catalog_path=catalog)
    with running_server(settings) as url:
        yield url


def test_body_too_large(small_server: str) -> None:
    resp = httpx.post(
        small_server + "/v1/images/edits",
        files=one(b"\0" * (2 * 1024 * 1024)),
        data={"prompt": "x", "model": "kontext-tiny"},
    )
    assert_error(resp, 413, "request_too_large")

    def chunks() -> Iterator[bytes]:  # no content-length: the limit applies while streaming
        for _ in range(40):
            yield b" " * 65536

    resp = httpx.post(
        small_server + "/v1/images/generations", content=chunks(), headers={"content-type": "application/json"}
    )
    assert_error(resp, 413, "request_too_large")


def test_unsupported_mode(small_server: str) -> None:
    resp = httpx.post(small_server + "/v1/images/generations", json={"model": "edit-only", "prompt": "x"})
    err = assert_error(resp, 400, "unsupported_mode", "model")
    assert "does not support text-to-image" in err["message"]


def test_custom_catalog_model_prices_and_ratios(small_server: str) -> None:
    resp = httpx.post(
        small_server + "/v1/images/edits",
        files=one(png_bytes(64, 64)),
        data={
            "model": "edit-only",
            "prompt": "x",
            "aspect_ratio": "7:1",
            "resolution": "0.5K",
            "response_format": "b64_json",
            "n": "2",
        },
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["metadata"]["cost"] == pytest.approx(0.02)  # 2 images at $0.01
    img = Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"])))
    w, h = img.size
    assert round(w / h) == 8  # 7:1 maps to 8:1 on a model with 4:1 and 8:1
