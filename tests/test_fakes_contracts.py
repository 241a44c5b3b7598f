"""The four fakes answer in the published response shapes, with every documented status, refuse what the
published request schemas refuse, and serve the upload mechanisms and second hosts the real APIs have.

Driven over HTTP without a gateway: each JSON answer is checked against its response schema
(kontext_gateway.providers.contracts), so a fake that drifts from the contracts fails here, not in an
adapter's test where it would hide a breach.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from conftest import noise_png, open_image, png_bytes
from fakes.bfl import FakeBFL
from fakes.common import serve
from fakes.fal import FakeFal
from fakes.fireworks import PREFIX, FakeFireworks
from fakes.replicate import DATA_URL_LIMIT, MODERATION, FakeReplicate
from kontext_gateway.providers import contracts


def conforms(key: str, body: Any) -> None:
    assert contracts.response_errors(key, body) == [], body


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


# -- BFL -----------------------------------------------------------------------------------------------------

BFL_AUTH = {"x-key": "bfl_test"}


@pytest.fixture(scope="module")
def bfl() -> Iterator[tuple[FakeBFL, str]]:
    fake = FakeBFL(pending_polls=1, run_s=600)
    with serve(fake.app) as url:
        yield fake, url


@pytest.fixture
def bfl_fake(bfl: tuple[FakeBFL, str]) -> Iterator[tuple[FakeBFL, str]]:
    bfl[0].reset()
    yield bfl
    bfl[0].reset()


def bfl_task(url: str, **body: Any) -> dict[str, Any]:
    resp = httpx.post(f"{url}/v1/flux-kontext-pro", json={"prompt": "x", **body}, headers=BFL_AUTH)
    assert resp.status_code == 200, resp.text
    conforms("bfl.submit", resp.json())
    return resp.json()


def bfl_polls(task: dict[str, Any], n: int = 3) -> list[httpx.Response]:
    return [httpx.get(task["polling_url"], headers=BFL_AUTH) for _ in range(n)]


def test_bfl_every_status_in_the_published_shape(bfl_fake: tuple[FakeBFL, str]) -> None:
    fake, url = bfl_fake
    pending, ready, again = bfl_polls(bfl_task(url, output_format="webp"))
    assert [r.json()["status"] for r in (pending, ready, again)] == ["Pending", "Ready", "Ready"]
    for r in (pending, ready):
        conforms("bfl.get_result", r.json())
    assert open_image(httpx.get(ready.json()["result"]["sample"]).content).format == "WEBP"

    fake.faults.add("moderation", at="submit", reasons=["Safety Filter"])
    [moderated] = bfl_polls(bfl_task(url), 1)
    assert moderated.json()["status"] == "Request Moderated" and moderated.json()["result"] is None
    assert moderated.json()["details"] == {"Moderation Reasons": ["Safety Filter"]}
    fake.faults.add("moderation", at="poll")
    fake.faults.add("task_error", at="poll")
    statuses = []
    for _ in range(2):
        [answer] = bfl_polls(bfl_task(url), 1)
        conforms("bfl.get_result", answer.json())
        statuses.append(answer.json()["status"])
    assert statuses == ["Content Moderated", "Error"]
    fake.faults.add("moderation", at="poll", variant="Request Moderated")  # input flagged, seen at a poll
    [late] = bfl_polls(bfl_task(url), 1)
    assert late.json()["status"] == "Request Moderated"

    lost = httpx.get(f"{fake.polling.url}/v1/get_result?id=nope", headers=BFL_AUTH)
    assert lost.status_code == 404
    conforms("bfl.get_result", lost.json())
    assert lost.json()["status"] == "Task not found"


def test_bfl_newer_progress_states_are_outside_the_published_enum(bfl_fake: tuple[FakeBFL, str]) -> None:
    """Some clients report "Reasoning" / "Generating" while a task runs: a mode of the fake, and the one
    answer here that the published schema does not take."""
    fake, url = bfl_fake
    fake.pending_polls, fake.states = 2, ("Reasoning", "Generating")
    first, second, done = bfl_polls(bfl_task(url))
    assert [first.json()["status"], second.json()["status"], done.json()["status"]] == [
        "Reasoning",
        "Generating",
        "Ready",
    ]
    for r in (first, second):
        assert [e.split(":")[0] for e in contracts.response_errors("bfl.get_result", r.json())] == ["status"]


def test_bfl_polls_on_another_host_and_refuses_in_its_own_shape(bfl_fake: tuple[FakeBFL, str]) -> None:
    fake, url = bfl_fake
    task = bfl_task(url)
    poll, submit = httpx.URL(task["polling_url"]), httpx.URL(url)
    assert poll.host != submit.host and poll.port != submit.port and fake.other_origins == [fake.polling.url]
    rebuilt = httpx.get(f"{url}/v1/get_result?id={task['id']}", headers=BFL_AUTH)
    assert rebuilt.status_code == 404 and rebuilt.json()["status"] == "Task not found"
    assert fake.misrouted and [r.host for r in fake.received if r.path.startswith("/v1/get_result")] == [
        submit.netloc.decode()
    ]

    refused = httpx.post(
        f"{url}/v1/flux-kontext-max",
        json={"prompt": "x", "input_image_5": "https://example.com/a.png", "safety_tolerance": 9},
        headers=BFL_AUTH,
    )
    assert refused.status_code == 422
    conforms("bfl.validation-error", refused.json())
    assert [d["loc"] for d in refused.json()["detail"]] == [["body", "input_image_5"], ["body", "safety_tolerance"]]
    [refusal] = fake.refused
    assert refusal.route == "bfl.flux-kontext-max" and refusal.status == 422
    assert refusal.problems == [
        "input_image_5: Extra inputs are not permitted",
        "safety_tolerance: Input should be less than or equal to 6",
    ]
    sizes = [r.size for r in fake.received if r.method == "POST"]
    assert sizes[-1] == len(refused.request.content) and all(s > 0 for s in sizes)


# -- Fireworks -------------------------------------------------------------------------------------------------

FW_AUTH = {"Authorization": "Bearer fw_test"}


@pytest.fixture(scope="module")
def fireworks() -> Iterator[tuple[FakeFireworks, str]]:
    fake = FakeFireworks(pending_polls=1)
    with serve(fake.app) as url:
        yield fake, url


def test_fireworks_every_status_in_the_published_shape(fireworks: tuple[FakeFireworks, str]) -> None:
    fake, url = fireworks
    fake.reset()

    def submit(**body: Any) -> str:
        resp = httpx.post(f"{url}{PREFIX}/flux-kontext-pro", json={"prompt": "x", **body}, headers=FW_AUTH)
        assert resp.status_code == 200, resp.text
        conforms("fireworks.submit", resp.json())
        return str(resp.json()["request_id"])

    def poll(rid: str, model: str = "flux-kontext-pro") -> dict[str, Any]:
        resp = httpx.post(f"{url}{PREFIX}/{model}/get_result", json={"id": rid}, headers=FW_AUTH)
        assert resp.status_code == 200, resp.text
        conforms("fireworks.get_result", resp.json())
        return dict(resp.json())

    rid = submit()
    assert [poll(rid)["status"], poll(rid)["status"]] == ["Pending", "Ready"]
    assert poll(rid, "flux-kontext-max")["status"] == "Task not found"
    fake.faults.add("moderation", at="submit", reasons=["Safety Filter"])
    moderated = poll(submit())
    assert moderated["status"] == "Request Moderated" and moderated["details"] == {
        "Moderation Reasons": ["Safety Filter"]
    }
    fake.faults.add("moderation", at="poll")
    assert poll(submit())["status"] == "Content Moderated"
    fake.faults.add("task_error", at="poll")
    assert poll(submit())["status"] == "Error"

    wrong = httpx.post(f"{url}{PREFIX}/flux-kontext-pro", json={"prompt": "x", "input_image_2": "y"}, headers=FW_AUTH)
    assert wrong.status_code == 422  # BFL's 422 shape: Fireworks documents none of its own
    conforms("bfl.validation-error", wrong.json())
    extra = httpx.post(f"{url}{PREFIX}/flux-kontext-pro/get_result", json={"id": rid, "x": 1}, headers=FW_AUTH)
    assert extra.status_code == 422 and extra.json()["detail"][0]["loc"] == ["body", "x"]
    assert [r.route for r in fake.refused] == ["fireworks.flux-kontext-pro", "fireworks.get_result"]


# -- fal -----------------------------------------------------------------------------------------------------

FAL_AUTH = {"Authorization": "Key fal_test"}


@pytest.fixture(scope="module")
def fal() -> Iterator[tuple[FakeFal, str]]:
    fake = FakeFal(pending_polls=2)
    with serve(fake.app) as url:
        yield fake, url


@pytest.fixture
def fal_fake(fal: tuple[FakeFal, str]) -> Iterator[tuple[FakeFal, str]]:
    fal[0].reset()
    yield fal
    fal[0].reset()


def fal_run(url: str, route: str, body: dict[str, Any]) -> httpx.Response:
    """Submit, poll to COMPLETED (each answer checked), then GET the result."""
    sub = httpx.post(f"{url}/{route}", json=body, headers=FAL_AUTH)
    assert sub.status_code == 200, sub.text
    conforms("fal.queue.submit", sub.json())
    seen = []
    for _ in range(10):
        status = httpx.get(sub.json()["status_url"], headers=FAL_AUTH).json()
        conforms("fal.queue.status", status)
        seen.append(status["status"])
        if status["status"] == "COMPLETED":
            break
    assert seen == ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
    return httpx.get(sub.json()["response_url"], headers=FAL_AUTH)


IMAGE = data_uri(png_bytes(64, 48))
FAL_BODIES = {
    "fal-ai/flux-pro/kontext": {"prompt": "x", "image_url": IMAGE, "safety_tolerance": "2"},
    "fal-ai/flux-pro/kontext/max": {"prompt": "x", "image_url": IMAGE, "enhance_prompt": True},
    "fal-ai/flux-pro/kontext/text-to-image": {"prompt": "x", "num_images": 2},
    "fal-ai/flux-pro/kontext/max/text-to-image": {"prompt": "x", "aspect_ratio": "9:16"},
    "fal-ai/flux-pro/kontext/multi": {"prompt": "x", "image_urls": [IMAGE, IMAGE]},
    "fal-ai/flux-pro/kontext/max/multi": {"prompt": "x", "image_urls": [IMAGE, "https://example.com/b.png"]},
    "fal-ai/flux-kontext/dev": {"prompt": "x", "image_url": IMAGE, "acceleration": "high"},
    "fal-ai/flux-kontext-lora": {"prompt": "x", "image_url": IMAGE, "loras": [{"path": "a/b", "scale": 0.5}]},
}


@pytest.mark.parametrize("route", list(FAL_BODIES))
def test_fal_every_route_in_the_published_shape(fal_fake: tuple[FakeFal, str], route: str) -> None:
    _fake, url = fal_fake
    result = fal_run(url, route, FAL_BODIES[route])
    assert result.status_code == 200, result.text
    key = contracts.result_key("fal", route)
    assert key is not None
    conforms(key, result.json())


def test_fal_errors_moderation_and_cancel_in_the_published_shape(fal_fake: tuple[FakeFal, str]) -> None:
    fake, url = fal_fake
    invalid = fal_run(url, "fal-ai/flux-kontext/dev", {"prompt": "x", "image_url": IMAGE, "enhance_prompt": True})
    assert invalid.status_code == 422 and invalid.json()["detail"][0]["type"] == "extra_forbidden"
    conforms("fal.error", invalid.json())

    fake.faults.add("moderation", at="submit", reasons=["violence"])
    flagged = fal_run(url, "fal-ai/flux-pro/kontext/text-to-image", {"prompt": "x"})
    assert flagged.status_code == 422 and flagged.headers["x-fal-retryable"] == "false"
    conforms("fal.error", flagged.json())
    [item] = flagged.json()["detail"]
    assert item["type"] == "content_policy_violation" and item["msg"] == "The content was flagged by a content checker."
    assert item["categories"] == ["violence"]

    fake.faults.add("moderation", at="submit")  # [dev]: its own checker's flag, in a 200 result
    nsfw = fal_run(url, "fal-ai/flux-kontext/dev", {"prompt": "x", "image_url": IMAGE})
    assert nsfw.status_code == 200 and nsfw.json()["has_nsfw_concepts"] == [True]
    conforms("fal.kontext-dev.result", nsfw.json())
    fake.faults.add("moderation", at="submit")  # the checker off: nothing is flagged
    off = fal_run(url, "fal-ai/flux-kontext/dev", {"prompt": "x", "image_url": IMAGE, "enable_safety_checker": False})
    assert off.json()["has_nsfw_concepts"] == [False]
    fake.faults.add("moderation", at="submit", variant="nsfw_concepts")  # the flag on a pro route
    pro = fal_run(url, "fal-ai/flux-pro/kontext/text-to-image", {"prompt": "x", "num_images": 2})
    assert pro.status_code == 200 and pro.json()["has_nsfw_concepts"] == [True, True]

    unauthorized = httpx.post(f"{url}/fal-ai/flux-pro/kontext", json={}, headers={"Authorization": "Key no"})
    assert unauthorized.status_code == 401
    conforms("fal.error", unauthorized.json())
    fake.pending_polls = 100
    sub = httpx.post(f"{url}/fal-ai/flux-pro/kontext/text-to-image", json={"prompt": "x"}, headers=FAL_AUTH).json()
    cancel = httpx.put(sub["cancel_url"], headers=FAL_AUTH)
    assert cancel.status_code == 202
    conforms("fal.queue.cancel", cancel.json())
    assert httpx.put(sub["cancel_url"].replace(sub["request_id"], "nope"), headers=FAL_AUTH).json() == {
        "status": "NOT_FOUND"
    }


def test_fal_storage_upload_on_its_own_hosts(fal_fake: tuple[FakeFal, str]) -> None:
    fake, url = fal_fake
    assert fake.storage_url is not None and fake.other_origins == [fake.storage_url]
    assert httpx.URL(fake.storage_url).netloc != httpx.URL(url).netloc
    picture = png_bytes(300, 100)
    initiate = f"{fake.storage_url}/storage/upload/initiate?storage_type=fal-cdn-v3"
    assert httpx.post(initiate, json={"content_type": "image/png", "file_name": "a.png"}).status_code == 401
    assert httpx.post(initiate, json={"content_type": "image/png"}, headers=FAL_AUTH).status_code == 422
    urls = httpx.post(initiate, json={"content_type": "image/png", "file_name": "in.png"}, headers=FAL_AUTH).json()
    assert set(urls) == {"upload_url", "file_url"}
    cdn = httpx.URL(urls["upload_url"]).netloc
    assert cdn not in (httpx.URL(url).netloc, httpx.URL(fake.storage_url).netloc)  # a third host, with no key

    # Used before its bytes arrive, the file does not load.
    early = fal_run(url, "fal-ai/flux-pro/kontext", {"prompt": "x", "image_url": urls["file_url"]})
    assert early.status_code == 422 and early.json()["detail"][0]["type"] == "image_load_error"
    assert httpx.put(urls["upload_url"], content=picture, headers={"content-type": "image/png"}).status_code == 200
    assert httpx.get(urls["file_url"]).content == picture
    done = fal_run(url, "fal-ai/flux-pro/kontext", {"prompt": "x", "image_url": urls["file_url"]})
    assert done.status_code == 200
    image = done.json()["images"][0]
    assert image["width"] > 2 * image["height"]  # the uploaded 3:1 picture's shape, read from the upload

    [upload] = fake.uploads
    assert (upload.filename, upload.content_type, upload.size, upload.uploaded) == (
        "in.png",
        "image/png",
        len(picture),
        True,
    )
    assert "authorization" not in upload.headers  # what the PUT carried
    put = [r for r in fake.received if r.method == "PUT"]
    assert [(r.host, r.size) for r in put] == [(cdn.decode(), len(picture))]
    assert [m for m, *_ in fake.storage_requests] == ["POST", "POST", "POST", "PUT", "GET"]


# -- Replicate -------------------------------------------------------------------------------------------------

R_AUTH = {"Authorization": "Bearer r8_test"}


@pytest.fixture(scope="module")
def replicate() -> Iterator[tuple[FakeReplicate, str]]:
    fake = FakeReplicate(pending_polls=1)
    with serve(fake.app) as url:
        yield fake, url


@pytest.fixture
def rep(replicate: tuple[FakeReplicate, str]) -> Iterator[tuple[FakeReplicate, str]]:
    replicate[0].reset()
    yield replicate
    replicate[0].reset()


def create(url: str, model: str, inputs: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}/v1/models/{model}/predictions", json={"input": inputs}, headers=R_AUTH)


def run_prediction(url: str, model: str, inputs: dict[str, Any]) -> list[dict[str, Any]]:
    """Create, then poll urls.get until a terminal status; every answer, each checked."""
    created = create(url, model, inputs)
    assert created.status_code == 201, created.text
    answers = [created.json()]
    while answers[-1]["status"] in ("starting", "processing"):
        answers.append(httpx.get(answers[-1]["urls"]["get"], headers=R_AUTH).json())
    for answer in answers:
        conforms("replicate.prediction", answer)
    return answers


def test_replicate_every_status_in_the_published_shape(rep: tuple[FakeReplicate, str]) -> None:
    fake, url = rep
    ok = run_prediction(url, "black-forest-labs/flux-kontext-pro", {"prompt": "x"})
    assert [a["status"] for a in ok] == ["starting", "processing", "succeeded"] and ok[-1]["output"]
    fake.faults.add("task_error", at="poll")
    assert run_prediction(url, "black-forest-labs/flux-kontext-max", {"prompt": "x"})[-1]["status"] == "failed"
    fake.pending_polls = 100
    started = create(url, "black-forest-labs/flux-kontext-pro", {"prompt": "x"}).json()
    canceled = httpx.post(started["urls"]["cancel"], headers=R_AUTH)
    conforms("replicate.prediction", canceled.json())
    assert canceled.json()["status"] == "canceled"


@pytest.mark.parametrize("variant", list(MODERATION))
def test_replicate_moderation_wordings(rep: tuple[FakeReplicate, str], variant: str) -> None:
    fake, url = rep
    fake.faults.add("moderation", at="poll", variant=variant)
    final = run_prediction(url, "black-forest-labs/flux-kontext-pro", {"prompt": "x"})[-1]
    assert final["status"] == "failed" and final["error"] == MODERATION[variant] and final["output"] is None


def test_replicate_dev_moderation_is_its_own_checker(rep: tuple[FakeReplicate, str]) -> None:
    fake, url = rep
    image = data_uri(png_bytes(32, 32))
    fake.faults.add("moderation", at="poll")
    flagged = run_prediction(url, "black-forest-labs/flux-kontext-dev", {"prompt": "x", "input_image": image})[-1]
    assert flagged["error"] == MODERATION["dev_nsfw"]
    fake.faults.add("moderation", at="poll")
    unchecked = {"prompt": "x", "input_image": image, "disable_safety_checker": True}
    assert run_prediction(url, "black-forest-labs/flux-kontext-dev", unchecked)[-1]["status"] == "succeeded"


def test_replicate_refuses_fields_a_model_lacks_in_problem_details(rep: tuple[FakeReplicate, str]) -> None:
    fake, url = rep
    image = "https://example.com/a.png"
    inputs = {"prompt": "x", "input_image_1": image, "input_image_2": image, "prompt_upsampling": True}
    for model in ("flux-kontext-apps/multi-image-kontext-pro", "flux-kontext-apps/multi-image-kontext-max"):
        refused = create(url, model, inputs)
        assert refused.status_code == 422 and refused.headers["content-type"] == "application/problem+json"
        body = refused.json()
        assert body["title"] == "Input validation failed" and body["status"] == 422
        assert body["detail"] == "- input: Additional property prompt_upsampling is not allowed\n"
        assert body["invalid_fields"] == [
            {
                "type": "additional_property_not_allowed",
                "field": "input",
                "description": "Additional property prompt_upsampling is not allowed",
            }
        ]
    assert [r.route for r in fake.refused] == ["replicate.flux-kontext-apps__multi-image-kontext-pro"] * 2
    envelope = httpx.post(
        f"{url}/v1/models/black-forest-labs/flux-kontext-pro/predictions",
        json={"input": {"prompt": "x"}, "wait": 5},
        headers=R_AUTH,
    )
    assert envelope.status_code == 422 and "Additional property wait is not allowed" in envelope.json()["detail"]


def test_replicate_data_urls_stop_at_256_kb_and_the_files_api_takes_more(rep: tuple[FakeReplicate, str]) -> None:
    fake, url = rep
    small, big = noise_png(200, 100), noise_png(400, 300)
    assert len(small) <= DATA_URL_LIMIT < len(big)
    model = "black-forest-labs/flux-kontext-pro"
    assert run_prediction(url, model, {"prompt": "x", "input_image": data_uri(small)})[-1]["status"] == "succeeded"
    refused = create(url, model, {"prompt": "x", "input_image": data_uri(big)})
    assert refused.status_code == 422 and "data URLs are for files up to 256 KB" in refused.json()["detail"]
    assert fake.refused[-1].problems[0].startswith("input.input_image: a data URL carries")

    created = httpx.post(
        f"{url}/v1/files",
        files={"content": ("big.png", big, "image/png")},
        data={"filename": "big.png", "type": "image/png", "metadata": '{"job": "1"}'},
        headers=R_AUTH,
    )
    assert created.status_code == 201, created.text
    conforms("replicate.file", created.json())
    file = created.json()
    assert file["size"] == len(big) and file["content_type"] == "image/png" and file["metadata"] == {"job": "1"}
    assert httpx.get(file["urls"]["get"], headers=R_AUTH).json()["id"] == file["id"]
    assert httpx.get(f"{file['urls']['get']}/download", headers=R_AUTH).content == big
    [upload] = fake.uploads
    assert (upload.filename, upload.size, upload.url) == ("big.png", len(big), file["urls"]["get"])
    assert max(r.size for r in fake.received if r.path == "/v1/files") > len(big)  # the multipart body

    final = run_prediction(url, model, {"prompt": "x", "input_image": file["urls"]["get"]})[-1]
    assert final["status"] == "succeeded"
    assert open_image(httpx.get(final["output"]).content).width > open_image(httpx.get(final["output"]).content).height
    assert httpx.delete(file["urls"]["get"], headers=R_AUTH).status_code == 204
    gone = create(url, model, {"prompt": "x", "input_image": file["urls"]["get"]})
    assert gone.status_code == 422 and "File not found" in gone.json()["detail"]


def test_replicate_files_api_limits(rep: tuple[FakeReplicate, str]) -> None:
    fake, url = rep
    fake.file_limit = 1000
    too_big = httpx.post(f"{url}/v1/files", files={"content": ("a.bin", b"x" * 1000)}, headers=R_AUTH)
    assert too_big.status_code == 413 and too_big.json()["detail"] == "Files must be less than 100MB in size"
    assert httpx.post(f"{url}/v1/files", data={"filename": "a"}, headers=R_AUTH).status_code == 422
    assert httpx.post(f"{url}/v1/files", files={"content": ("a", b"x")}).status_code == 401
    long_name = httpx.post(
        f"{url}/v1/files", files={"content": ("a", b"x")}, data={"filename": "n" * 256}, headers=R_AUTH
    )
    assert long_name.status_code == 422
    assert httpx.get(f"{url}/v1/files/nope", headers=R_AUTH).status_code == 404
