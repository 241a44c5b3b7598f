"""The local engine's features through the public API: streaming with previews (the OpenAI SDK's stream), edit chains by
id or by this gateway's own link (no upload), masks with OpenAI's semantics, and clear refusals where
a provider cannot do what is asked."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from conftest import open_image, png_bytes, running_server
from kontext_gateway.config import Settings


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory):
    with running_server(Settings(data_dir=tmp_path_factory.mktemp("edits"))) as url:
        yield url


@pytest.fixture(scope="module")
def sdk(base: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


def test_streaming_generation_sends_partial_then_completed_images(sdk: openai.OpenAI) -> None:
    events = list(
        sdk.images.generate(
            model="kontext-tiny",
            prompt="a fox",
            size="64x48",
            stream=True,
            partial_images=2,
            extra_body={"seed": 3, "num_inference_steps": 4},
        )
    )
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    for e in events:
        img = open_image(base64.b64decode(e.b64_json))
        assert img.size == (64, 48) and img.format == "PNG"
    # The completed image is the one a plain request with the same seed makes.
    plain = sdk.images.generate(
        model="kontext-tiny",
        prompt="a fox",
        size="64x48",
        response_format="b64_json",
        extra_body={"seed": 3, "num_inference_steps": 4},
    )
    assert base64.b64decode(events[-1].b64_json) == base64.b64decode(plain.data[0].b64_json)


def test_streaming_edit_uses_edit_events(sdk: openai.OpenAI) -> None:
    stream = sdk.images.edit(
        model="kontext-tiny",
        prompt="night",
        image=("in.png", png_bytes(48, 48)),
        size="48x48",
        stream=True,
        partial_images=1,
    )
    events = list(stream)
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert open_image(base64.b64decode(events[-1].b64_json)).size == (48, 48)


def test_streaming_without_partial_images_and_bad_requests(sdk: openai.OpenAI) -> None:
    events = list(sdk.images.generate(model="kontext-tiny", prompt="x", size="32x32", stream=True))
    assert [e.type for e in events] == ["image_generation.completed"]
    with pytest.raises(openai.BadRequestError) as err:  # refused before the stream starts: a plain 400
        list(sdk.images.generate(model="kontext-tiny", prompt="x", size="0x0", stream=True))
    assert err.value.body["param"] == "size"


def test_an_edit_chain_by_id_and_by_own_link_needs_no_upload(base: str) -> None:
    first = httpx.post(
        base + "/v1/images/generations",
        timeout=120,
        json={"model": "kontext-tiny", "prompt": "a house", "size": "64x64", "seed": 1},
    )
    assert first.status_code == 200
    rid = first.headers["x-request-id"]
    second = httpx.post(
        base + "/v1/images/edits",
        timeout=120,
        json={"model": "kontext-tiny", "prompt": "add snow", "previous_response_id": rid, "seed": 2, "size": "64x64"},
    )
    assert second.status_code == 200, second.text
    third = httpx.post(
        base + "/v1/images/edits",
        timeout=120,
        json={
            "model": "kontext-tiny",
            "prompt": "at night",
            "seed": 3,
            "size": "64x64",
            "images": [{"image_url": second.json()["data"][0]["url"]}],
        },
    )  # this gateway's signed link
    assert third.status_code == 200, third.text
    assert open_image(httpx.get(third.json()["data"][0]["url"]).content).size == (64, 64)
    # The same as uploading the bytes.
    uploaded = httpx.post(
        base + "/v1/images/edits",
        timeout=120,
        data={"model": "kontext-tiny", "prompt": "add snow", "seed": "2", "size": "64x64"},
        files={"image": ("p.png", httpx.get(first.json()["data"][0]["url"]).content, "image/png")},
    )
    assert httpx.get(uploaded.json()["data"][0]["url"]).content == httpx.get(second.json()["data"][0]["url"]).content

    missing = httpx.post(
        base + "/v1/images/edits", json={"model": "kontext-tiny", "prompt": "x", "previous_response_id": "req_nope"}
    )
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "previous_response_id"
    forged = second.json()["data"][0]["url"].replace("sig=", "sig=0")
    bad = httpx.post(
        base + "/v1/images/edits", json={"model": "kontext-tiny", "prompt": "x", "images": [{"image_url": forged}]}
    )
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_image_url"


def test_mask_edits_keep_the_opaque_area(sdk: openai.OpenAI) -> None:
    source = Image.new("RGB", (64, 64), (30, 140, 220))
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 64))  # transparent left half: edit it; keep the right half
    buf_s, buf_m = io.BytesIO(), io.BytesIO()
    source.save(buf_s, "PNG")
    mask.save(buf_m, "PNG")
    resp = sdk.images.edit(
        model="kontext-tiny",
        prompt="paint it",
        image=("s.png", buf_s.getvalue()),
        mask=("m.png", buf_m.getvalue()),
        response_format="b64_json",
        size="64x64",
        extra_body={"seed": 5},
    )
    out = open_image(base64.b64decode(resp.data[0].b64_json)).convert("RGB")
    assert out.size == (64, 64)

    def mean_diff(box: tuple[int, int, int, int]) -> float:
        a, b = out.crop(box).tobytes(), source.crop(box).tobytes()  # RGB: three bytes a pixel
        return sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a)

    kept, edited = mean_diff((40, 0, 64, 64)), mean_diff((0, 0, 24, 64))  # away from the seam
    assert kept < edited / 2, (kept, edited)


def test_remote_providers_refuse_what_they_cannot_do(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, fal_key="fal_x", fal_base_url="http://127.0.0.1:9")
    with running_server(settings) as url:
        mask = ("mask", ("m.png", png_bytes(32, 32), "image/png"))
        resp = httpx.post(
            url + "/v1/images/edits",
            data={"model": "flux.1-kontext-pro", "prompt": "x"},
            files=[("image", ("i.png", png_bytes(32, 32), "image/png")), mask],
        )
        loras = httpx.post(
            url + "/v1/images/generations",
            json={"model": "flux.1-kontext-pro", "prompt": "x", "loras": [{"path": "style.safetensors"}]},
        )
    for r, words in ((resp, "does not take a mask"), (loras, "does not take LoRA adapters")):
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_by_providers"
        assert words in r.json()["error"]["message"] and "fal/flux.1-kontext-pro" in r.json()["error"]["message"]
