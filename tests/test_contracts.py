"""Every request the dialects build, and every answer they read, checked against the providers' own
published schemas (vendored in kontext_gateway/providers/contracts/, each naming its source).

No HTTP: a table of models x modes x parameters x 0-4 input images is built by each dialect and the
bodies are validated with jsonschema against the route's closed request schema (an unknown field is an
error). The parsers read published response shapes, in every documented status. A new provider is
one dialect and one row here.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from kontext_gateway.catalog import Catalog, ProviderEntry
from kontext_gateway.config import Settings
from kontext_gateway.params import Size, SizeRequest
from kontext_gateway.providers import DIALECTS, contracts, inputs
from kontext_gateway.providers.base import ImageJob
from kontext_gateway.providers.calls import Answer, Call, Done, Fetch, Pending, Task
from kontext_gateway.providers.dialect import Dialect
from kontext_gateway.providers.errors import Malformed, Moderated, ServerError, TaskFailed, TaskLost
from kontext_gateway.providers.table import markdown

CATALOG = Catalog.load()
SETTINGS = Settings()
HOSTED = {d.name: d(SETTINGS) for d in DIALECTS}
ENTRIES = [(model.id, entry) for model in CATALOG.models for entry in model.providers if entry.provider in HOSTED]
PHOTO = Image.effect_mandelbrot((900, 600), (-2.0, -1.0, 1.0, 1.0), 60).convert("RGB")

# Requests a user may send, as (size, extra fields of the job, extra parameters): all valid for the
# unified API; each route must build a body its provider accepts, or say what it cannot do.
SHAPES: list[dict[str, Any]] = [
    {},
    {"size": SizeRequest(Size(1024, 768), exact=True)},
    {"size": SizeRequest(Size(1184, 880), aspect_ratio="4:3", tier="1K")},
    {"size": SizeRequest(Size(672, 1568), aspect_ratio="9:21", tier="1K")},
    {"size": SizeRequest(Size(2048, 1024), exact=True)},  # 2:1, past what some routes have
]
OPTIONS: list[dict[str, Any]] = [
    {},
    {"output_format": "jpeg", "output_compression": 60},
    {"output_format": "webp"},
    {"output_format": "avif"},
    {"guidance": 3.5},
    {"steps": 28},
    {"seed": 2**32 - 1},
    {"extra": {"prompt_upsampling": True}},
    {"extra": {"prompt_upsampling": "true", "safety_tolerance": "2"}},
    {"extra": {"safety_tolerance": 6}},
    {"extra": {"safety_tolerance": 0}},
    {"extra": {"enhance_prompt": True, "sync_mode": False}},
    {"extra": {"acceleration": "regular", "resolution_mode": "auto"}},
    {"extra": {"output_quality": 90, "disable_safety_checker": True, "enable_safety_checker": False}},
    {"extra": {"an_unknown_knob": 1}},
]
COUNTS = [1, 4, 7]


def job_for(model_id: str, images: int, count: int, **fields: Any) -> ImageJob:
    model = CATALOG.get(model_id)
    extra = fields.pop("extra", {})
    args: dict[str, Any] = {
        "request_id": "req_contract",
        "model": model,
        "mode": "edit" if images else "text-to-image",
        "prompt": "a lighthouse at dusk",
        "images": [PHOTO] * images,
        "size": SizeRequest(None),
        "n": count,
        "seed": 42,
        "output_format": "png",
        "output_compression": None,
        "extra": dict(extra),
    }
    args.update(fields)
    return ImageJob(**args)


def servable(entry: ProviderEntry, images: int) -> bool:
    mode = "edit" if images else "text-to-image"
    return (entry.modes is None or mode in entry.modes) and images <= entry.max_input_images


def cases() -> list[Any]:
    out = []
    for (model_id, entry), images in itertools.product(ENTRIES, range(5)):
        if servable(entry, images):
            out.append(pytest.param(model_id, entry, images, id=f"{entry.config_key}-{images}img"))
    return out


ENCODED = inputs.compact(PHOTO)


def refs(dialect: Dialect, images: int) -> list[str]:
    """The inputs as the executor hands them to a dialect: compacted, inline (or an uploaded URL)."""
    return [dialect.image_ref(ENCODED, None) for _ in range(images)]


@pytest.mark.parametrize(("model_id", "entry", "images"), cases())
def test_every_request_validates_against_the_published_schema(model_id: str, entry: ProviderEntry, images: int) -> None:
    dialect = HOSTED[entry.provider]
    for shape, options, count in itertools.product(SHAPES, OPTIONS, COUNTS):
        job = job_for(model_id, images, count, **shape, **options)
        # Every one of these requests is valid for the unified API and within every route's ranges:
        # a route must build a body its provider takes for it.
        assert dialect.unsupported(entry, job) is None, (entry.config_key, shape, options)
        plan = dialect.submit(entry, job, min(dialect.batch_limit, count), refs(dialect, images))
        problems = contracts.request_errors(plan.route.key, plan.call.json)
        assert problems == [], (entry.config_key, plan.route.id, shape, options, problems)
        # What was asked is sent, or reported: nothing is dropped silently.
        sent = plan.call.json["input"] if entry.provider == "replicate" else plan.call.json
        for name in job.extra:
            assert name in sent or name in plan.ignored or (name, entry.provider) in TURNED_INTO, name


TURNED_INTO = {("prompt_upsampling", "fal")}  # sent as enhance_prompt


@pytest.mark.parametrize(
    ("config_key", "images", "route"),
    [
        ("replicate/flux.1-kontext-pro", 0, "black-forest-labs/flux-kontext-pro"),
        ("replicate/flux.1-kontext-pro", 1, "black-forest-labs/flux-kontext-pro"),
        ("replicate/flux.1-kontext-pro", 2, "flux-kontext-apps/multi-image-kontext-pro"),
        ("replicate/flux.1-kontext-max", 2, "flux-kontext-apps/multi-image-kontext-max"),
        ("replicate/flux.1-kontext-dev", 1, "black-forest-labs/flux-kontext-dev"),
        ("fal/flux.1-kontext-pro", 0, "fal-ai/flux-pro/kontext/text-to-image"),
        ("fal/flux.1-kontext-pro", 1, "fal-ai/flux-pro/kontext"),
        ("fal/flux.1-kontext-pro", 3, "fal-ai/flux-pro/kontext/multi"),
        ("fal/flux.1-kontext-max", 0, "fal-ai/flux-pro/kontext/max/text-to-image"),
        ("fal/flux.1-kontext-max-edit", 1, "fal-ai/flux-pro/kontext/max"),
        ("fal/flux.1-kontext-max-edit", 4, "fal-ai/flux-pro/kontext/max/multi"),
        ("fal/flux.1-kontext-dev", 1, "fal-ai/flux-kontext/dev"),
        ("fal/flux.1-kontext-dev-lora", 1, "fal-ai/flux-kontext-lora"),
        ("bfl/flux.1-kontext-max", 4, "flux-kontext-max"),
        ("fireworks/flux.1-kontext-pro", 1, "flux-kontext-pro"),
    ],
)
def test_each_request_goes_to_its_route(config_key: str, images: int, route: str) -> None:
    model, entry = CATALOG.resolve(config_key)
    assert entry is not None
    dialect = HOSTED[entry.provider]
    plan = dialect.submit(entry, job_for(model.id, images, 1), 1, refs(dialect, images))
    assert plan.route.id == route
    assert plan.call.url.split("?")[0].endswith(route if entry.provider != "replicate" else f"{route}/predictions")


def test_the_undocumented_multi_image_max_app_is_checked_as_its_pro_sibling() -> None:
    model, entry = CATALOG.resolve("replicate/flux.1-kontext-max")
    assert entry is not None
    plan = HOSTED["replicate"].submit(entry, job_for(model.id, 2, 1), 1, refs(HOSTED["replicate"], 2))
    assert plan.route.note and "multi-image-kontext-pro" in plan.route.note


@pytest.mark.parametrize(
    ("config_key", "images", "fields", "param", "words"),
    [
        ("fal/flux.1-kontext-pro", 0, {"guidance": 0.5}, "cfg_scale", "from 1 to 20"),
        ("fal/flux.1-kontext-pro", 0, {"extra": {"safety_tolerance": 7}}, "safety_tolerance", "one of 1, 2"),
        ("fal/flux.1-kontext-dev-lora", 1, {"steps": 60}, "num_inference_steps", "from 10 to 50"),
        ("replicate/flux.1-kontext-dev", 1, {"steps": 60}, "num_inference_steps", "from 4 to 50"),
        ("replicate/flux.1-kontext-dev", 1, {"guidance": 12.0}, "cfg_scale", "from 0 to 10"),
        ("replicate/flux.1-kontext-dev", 1, {"output_compression": 101}, "output_compression", "from 0 to 100"),
        ("bfl/flux.1-kontext-pro", 0, {"extra": {"safety_tolerance": 9}}, "safety_tolerance", "from 0 to 6"),
        ("fireworks/flux.1-kontext-pro", 0, {"extra": {"prompt_upsampling": "maybe"}}, "prompt_upsampling", "true or"),
    ],
)
def test_a_value_out_of_a_routes_range_is_refused_naming_the_parameter(
    config_key: str, images: int, fields: dict[str, Any], param: str, words: str
) -> None:
    model, entry = CATALOG.resolve(config_key)
    assert entry is not None
    refusal = HOSTED[entry.provider].unsupported(entry, job_for(model.id, images, 1, **fields))
    assert refusal is not None and refusal.param == param and words in refusal.reason, refusal


def test_parameters_a_route_lacks_are_never_sent() -> None:
    cases = [
        ("replicate/flux.1-kontext-pro", 2, "prompt_upsampling"),  # the multi-image apps have none
        ("fal/flux.1-kontext-dev", 1, "enhance_prompt"),
        ("fal/flux.1-kontext-dev", 1, "safety_tolerance"),
        ("fal/flux.1-kontext-dev", 1, "prompt_upsampling"),
        ("bfl/flux.1-kontext-pro", 0, "sync_mode"),
    ]
    for config_key, images, name in cases:
        model, entry = CATALOG.resolve(config_key)
        assert entry is not None
        dialect = HOSTED[entry.provider]
        job = job_for(model.id, images, 1, extra={name: True if name != "safety_tolerance" else 2})
        plan = dialect.submit(entry, job, 1, refs(dialect, images))
        body = plan.call.json.get("input", plan.call.json)
        assert name not in body, (config_key, body)
        if name == "prompt_upsampling":
            assert "enhance_prompt" not in body, (config_key, body)  # nor under another name
        assert name in plan.ignored, (config_key, plan.ignored)


# -- the answers: published shapes, every documented status ------------------------------------------------

ENTRY = {
    name: CATALOG.resolve(key)[1]
    for name, key in {
        "bfl": "bfl/flux.1-kontext-pro",
        "fireworks": "fireworks/flux.1-kontext-pro",
        "replicate": "replicate/flux.1-kontext-pro",
        "fal": "fal/flux.1-kontext-pro",
    }.items()
}


def answer(key: str, body: dict[str, Any], status: int = 200) -> Answer:
    """An upstream answer, after checking it has the shape the provider publishes."""
    assert contracts.response_errors(key, body) == [], (key, body)
    return Answer(status, body)


def polled(provider: str, key: str, body: dict[str, Any], task: Task | None = None, status: int = 200) -> Any:
    dialect = HOSTED[provider]
    return dialect.polled(ENTRY[provider], task or Task(id="t1", data=TASK_DATA[provider]), answer(key, body, status))


TASK_DATA = {
    "bfl": {"polling_url": "https://api.us1.bfl.ai/v1/get_result?id=t1"},
    "fireworks": {},
    "replicate": {"get": "https://api.replicate.com/v1/predictions/t1", "cancel": None},
    "fal": {
        "status_url": "https://queue.fal.run/fal-ai/flux-pro/requests/t1/status",
        "response_url": "https://queue.fal.run/fal-ai/flux-pro/requests/t1",
        "cancel_url": "https://queue.fal.run/fal-ai/flux-pro/requests/t1/cancel",
        "count": 1,
    },
}


@pytest.mark.parametrize("provider", ["bfl", "fireworks"])
def test_bfl_protocol_statuses(provider: str) -> None:
    key = f"{provider}.get_result"
    ready = {"id": "t1", "status": "Ready", "result": {"sample": "https://delivery.eu.bfl.ai/r.png"}}
    assert polled(provider, key, ready) == Done(["https://delivery.eu.bfl.ai/r.png"])
    assert polled(provider, key, {"id": "t1", "status": "Pending"}) == Pending()
    task = Task(id="t1", data=TASK_DATA[provider])
    for newer in ("Reasoning", "Generating", "Queued"):  # states the published schema does not list yet
        unlisted = Answer(200, {"id": "t1", "status": newer})
        assert contracts.response_errors(key, unlisted.body) != []
        assert HOSTED[provider].polled(ENTRY[provider], task, unlisted) == Pending()
    for flagged in ("Request Moderated", "Content Moderated"):
        body = {"id": "t1", "status": flagged, "result": None, "details": {"Moderation Reasons": ["Safety Filter"]}}
        with pytest.raises(Moderated, match="Safety Filter"):
            polled(provider, key, body)
    with pytest.raises(TaskFailed):
        polled(provider, key, {"id": "t1", "status": "Error", "details": {"error": "boom"}})
    with pytest.raises(TaskLost):
        polled(provider, key, {"id": "t1", "status": "Task not found"})
    with pytest.raises(Malformed):
        polled(provider, key, {"id": "t1", "status": "Ready", "result": {}})


def test_bfl_submit_answers_its_polling_url_as_is() -> None:
    body = {"id": "t1", "polling_url": "https://api.us1.bfl.ai/v1/get_result?id=t1", "cost": 4.0}
    task = HOSTED["bfl"].submitted(ENTRY["bfl"], answer("bfl.submit", body), 1)
    assert HOSTED["bfl"].poll(ENTRY["bfl"], task) == Call("GET", body["polling_url"])


def test_a_bfl_status_in_an_error_answer_is_read() -> None:
    """A moderated or lost task may come with a 404 or 503: the body's status decides."""
    dialect = HOSTED["bfl"]
    call = Call("GET", TASK_DATA["bfl"]["polling_url"])
    assert dialect.classify(Answer(404, {"id": "t1", "status": "Task not found"}), call) is None
    assert isinstance(dialect.classify(Answer(503, {"detail": "busy"}), call), ServerError)


def test_replicate_prediction_statuses() -> None:
    key = "replicate.prediction"

    def prediction(**fields: Any) -> dict[str, Any]:
        return {
            "id": "t1",
            "model": "black-forest-labs/flux-kontext-pro",
            "version": "hidden",
            "input": {"prompt": "x"},
            "output": None,
            "data_removed": False,
            "error": None,
            "status": "starting",
            "created_at": "2026-12-04T00:00:00Z",
            "urls": {
                "get": TASK_DATA["replicate"]["get"],
                "cancel": TASK_DATA["replicate"]["get"] + "/cancel",
                "web": "https://replicate.com/p/t1",
            },
            **fields,
        }

    for still in ("starting", "processing"):
        assert polled("replicate", key, prediction(status=still)) == Pending()
    done = prediction(status="succeeded", output="https://replicate.delivery/x/out.png")
    assert polled("replicate", key, done) == Done(["https://replicate.delivery/x/out.png"])
    for wording in (
        "The input or output was flagged as sensitive. Please try again with different inputs. (E005)",
        "The generated output was flagged as potentially sensitive by the safety system.",
        "Generated image contained NSFW content. Try running it again with a different prompt.",
    ):
        with pytest.raises(Moderated):
            polled("replicate", key, prediction(status="failed", error=wording))
    with pytest.raises(TaskFailed):
        polled("replicate", key, prediction(status="failed", error="CUDA out of memory"))
    with pytest.raises(TaskFailed):
        polled("replicate", key, prediction(status="canceled"))
    with pytest.raises(ServerError):  # never started: nothing ran, worth one more try
        polled("replicate", key, prediction(status="aborted"))


def test_replicate_file_answer_gives_the_url_to_send() -> None:
    body = {
        "id": "f1",
        "content_type": "image/jpeg",
        "size": 1,
        "checksums": {"sha256": "0" * 64},
        "metadata": {},
        "created_at": "2026-12-04T00:00:00Z",
        "expires_at": "2026-12-05T00:00:00Z",
        "urls": {"get": "https://api.replicate.com/v1/files/f1"},
    }
    url, then = HOSTED["replicate"].uploaded(answer("replicate.file", body, 201), ENCODED)
    assert url == "https://api.replicate.com/v1/files/f1" and then is None


def test_fal_queue_statuses_and_result() -> None:
    urls = {k: TASK_DATA["fal"][k] for k in ("status_url", "response_url", "cancel_url")}
    queued = {"status": "IN_QUEUE", "request_id": "t1", "queue_position": 3, **urls}
    assert polled("fal", "fal.queue.status", queued) == Pending()
    running = {"status": "IN_PROGRESS", "request_id": "t1", "logs": None, **urls}
    assert polled("fal", "fal.queue.status", running) == Pending()
    fetch = polled("fal", "fal.queue.status", {"status": "COMPLETED", "request_id": "t1", "logs": [], **urls})
    assert isinstance(fetch, Fetch) and fetch.call == Call("GET", TASK_DATA["fal"]["response_url"])
    result = {
        "images": [{"url": "https://v3.fal.media/files/a.png", "width": 1024, "height": 1024}],
        "has_nsfw_concepts": [False],
        "seed": 1,
        "prompt": "x",
        "timings": {},
    }
    task = Task(id="t1", data=TASK_DATA["fal"])
    done = HOSTED["fal"].fetched(ENTRY["fal"], task, answer("fal.kontext-t2i-multi.result", result))
    assert done == Done(["https://v3.fal.media/files/a.png"])
    flagged = {**result, "has_nsfw_concepts": [True]}  # the safety checker's verdict, per image
    with pytest.raises(Moderated):
        HOSTED["fal"].fetched(ENTRY["fal"], task, answer("fal.kontext-dev.result", flagged))


def test_fal_moderation_is_a_422_by_type_not_by_message() -> None:
    dialect = HOSTED["fal"]
    call = Call("GET", TASK_DATA["fal"]["response_url"])
    flagged = {
        "detail": [
            {
                "loc": ["body", "prompt"],
                "msg": "The content was flagged by a content checker.",
                "type": "content_policy_violation",
            }
        ]
    }
    assert isinstance(dialect.classify(answer("fal.error", flagged, 422), call), Moderated)
    invalid = {"detail": [{"loc": ["body", "seed"], "msg": "Input should be a valid integer", "type": "int_parsing"}]}
    error = dialect.classify(answer("fal.error", invalid, 422), call)
    assert error is not None and error.kind == "invalid_request"


def test_fal_submit_answer_keeps_the_returned_urls() -> None:
    body = {
        "status": "IN_QUEUE",
        "request_id": "t1",
        "response_url": TASK_DATA["fal"]["response_url"],
        "status_url": TASK_DATA["fal"]["status_url"],
        "cancel_url": TASK_DATA["fal"]["cancel_url"],
        "queue_position": 0,
    }
    task = HOSTED["fal"].submitted(ENTRY["fal"], answer("fal.queue.submit", body), 2)
    assert task.data == {**{k: body[k] for k in ("status_url", "response_url", "cancel_url")}, "count": 2}
    assert HOSTED["fal"].cancel(ENTRY["fal"], task) == Call("PUT", body["cancel_url"])


def test_fireworks_submit_and_poll_calls() -> None:
    dialect = HOSTED["fireworks"]
    task = dialect.submitted(ENTRY["fireworks"], answer("fireworks.submit", {"request_id": "t1"}), 1)
    call = dialect.poll(ENTRY["fireworks"], task)
    assert call.method == "POST" and call.url.endswith("/flux-kontext-pro/get_result")
    assert contracts.request_errors("fireworks.get_result", call.json) == []


def test_the_providers_page_shows_what_the_code_sends() -> None:
    page = (Path(__file__).parents[1] / "docs" / "providers-and-routing.md").read_text(encoding="utf-8")
    block = page.split("<!-- provider-table:begin -->\n", 1)[1].split("<!-- provider-table:end -->", 1)[0]
    assert block == markdown(), "the table is stale: paste `kontext providers` between its markers"
