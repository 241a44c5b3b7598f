"""The lean transformer inside the engine and the gateway: the same pictures as diffusers' transformer for
every feature, the `acceleration` modes (what they run, how far they move the picture, determinism), and
the switch as a user meets it through the OpenAI SDK."""

from __future__ import annotations

import base64

import numpy as np
import openai
import pytest
import torch
from PIL import Image

from conftest import open_image, running_server
from kontext_gateway.config import Settings
from kontext_gateway.engine.lean import fp8
from kontext_gateway.engine.lean.stepcache import TaylorCache, computed_steps
from kontext_gateway.engine.lora import LoraSpec
from kontext_gateway.engine.pipeline import KontextEngine
from kontext_gateway.errors import GatewayError
from kontext_gateway.params import Size


@pytest.fixture(scope="module")
def lean() -> KontextEngine:
    engine = KontextEngine.tiny("cpu", transformer="lean")
    engine.pipe.transformer.fp8_on_cpu = True  # fp8's numerics on the CPU (a GPU feature: slower here)
    return engine


def picture(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(im).astype(np.int16) for im in images])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(float) - b.astype(float)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


FEATURES = {
    "text-to-image": dict(output=Size(96, 64)),
    "edit": dict(images=[picture(96, 64, 1)], contexts=[Size(96, 64)], output=Size(96, 64)),
    "two images": dict(
        images=[picture(64, 64, 2), picture(48, 64, 3)], contexts=[Size(64, 64), Size(48, 64)], output=Size(64, 64)
    ),
    "mask": dict(
        images=[picture(64, 64, 4)],
        contexts=[Size(64, 64)],
        output=Size(64, 64),
        mask=Image.new("L", (64, 64), 255).crop((0, 0, 64, 64)),
    ),
    "true cfg, n=2": dict(output=Size(64, 64), negative_prompt="blurry", true_cfg_scale=3.0, n=2),
}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_lean_engine_makes_the_reference_s_pictures(feature: str, engine: KontextEngine, lean: KontextEngine) -> None:
    kwargs = dict(prompt="a lighthouse", steps=3, guidance=2.5, n=1, seed=5) | FEATURES[feature]
    want = pixels(engine.run(**kwargs))
    got = pixels(lean.run(**kwargs))
    assert engine.last_run.transformer == "diffusers" and lean.last_run.transformer == "lean"
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1  # fp32 on the CPU: the same picture, at most a rounding step apart
    assert lean.last_run.transformer_calls == 3 * (2 if "cfg" in feature else 1)


def test_previews_and_progress_work_on_the_lean_transformer(lean: KontextEngine) -> None:
    previews, progress = [], []
    out = lean.run(
        prompt="x",
        output=Size(64, 64),
        steps=4,
        guidance=2.5,
        n=1,
        seed=1,
        partial_images=2,
        preview=lambda i, im: previews.append((i, im.size)),
        progress=lambda i, n: progress.append(i),
    )
    assert [i for i, _ in previews] == [0, 1] and all(size == (64, 64) for _, size in previews)
    assert progress == [1, 2, 3, 4] and out[0].size == (64, 64)


def test_loras_are_refused_clearly_on_the_lean_transformer(lean: KontextEngine, tmp_path) -> None:
    with pytest.raises(GatewayError) as err:
        lean.run(
            prompt="x",
            output=Size(32, 32),
            steps=1,
            guidance=2.5,
            n=1,
            seed=1,
            loras=[LoraSpec(path=tmp_path / "style.safetensors", name="style")],
        )
    assert err.value.status == 400 and err.value.param == "loras" and "diffusers" in err.value.message


# ---------------------------------------------------------------------------------------------------
# acceleration


def test_regular_runs_fp8_linears_close_to_the_exact_picture(lean: KontextEngine) -> None:
    kwargs = dict(
        prompt="a fox",
        images=[picture(64, 64, 6)],
        contexts=[Size(64, 64)],
        output=Size(64, 64),
        steps=4,
        guidance=2.5,
        n=1,
        seed=3,
    )
    exact = pixels(lean.run(**kwargs))
    fast = pixels(lean.run(**kwargs, acceleration="regular"))
    assert lean.last_run.applied == ["fp8"] and lean.last_run.transformer_computed == 4
    assert 35 < psnr(fast, exact) < float("inf")  # moved, slightly (another seed moves it to ~22 dB)
    assert (pixels(lean.run(**kwargs, acceleration="regular")) == fast).all()  # deterministic
    assert (pixels(lean.run(**kwargs)) == exact).all()  # and "none" is exact again afterwards


def test_high_computes_13_of_28_steps_deterministically(lean: KontextEngine) -> None:
    kwargs = dict(prompt="a fox", output=Size(64, 64), steps=28, guidance=2.5, n=1, seed=4)
    exact = pixels(lean.run(**kwargs))
    fast = pixels(lean.run(**kwargs, acceleration="high"))
    info = lean.last_run
    assert info.applied == ["fp8", "step_cache"] and (info.transformer_calls, info.transformer_computed) == (28, 13)
    assert (pixels(lean.run(**kwargs, acceleration="high")) == fast).all()
    assert 30 < psnr(fast, exact) < float("inf")


def test_what_is_not_applied_is_not_reported(engine: KontextEngine) -> None:
    # diffusers' transformer: nothing
    engine.run(prompt="x", output=Size(32, 32), steps=1, guidance=2.5, n=1, seed=1, acceleration="high")
    assert engine.last_run.applied == [] and engine.trace()["applied"] == []
    # the lean one on a CPU: fp8 is no faster there, so not used; 4 steps are too few to skip any
    plain = KontextEngine.tiny("cpu", transformer="lean")
    plain.run(prompt="x", output=Size(32, 32), steps=4, guidance=2.5, n=1, seed=1, acceleration="high")
    assert plain.last_run.applied == [] and plain.last_run.transformer_computed == 4
    plain.run(prompt="x", output=Size(32, 32), steps=8, guidance=2.5, n=1, seed=1, acceleration="high")
    assert plain.last_run.applied == ["step_cache"] and plain.last_run.transformer_computed == 6


def test_fp8_linear_is_a_row_wise_scaled_fp8_matmul() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    linear.weight.data[3] *= 100  # an outlier row keeps its own scale: the other rows lose nothing to it
    x = torch.randn(2, 5, 64)
    layer = fp8.Fp8Linear(linear)
    assert torch.equal(layer(x), linear(x))  # inactive: the exact linear
    layer.active = True
    w8, ws = fp8.quantize_rows(linear.weight)
    x8, xs = fp8.quantize_rows(x.reshape(-1, 64))
    want = (x8.float() * xs) @ (w8.float() * ws).t() + linear.bias
    got = layer(x)
    assert got.shape == (2, 5, 32)
    assert torch.allclose(got.reshape(-1, 32), want, rtol=1e-5, atol=1e-5)
    assert ((got - linear(x)).norm() / linear(x).norm()) < 0.05
    assert w8.dtype == torch.float8_e4m3fn and ws.shape == (32, 1)


def test_the_step_cache_schedule_and_extrapolation() -> None:
    assert computed_steps(28) == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 25, 26, 27]
    assert computed_steps(4) == [0, 1, 2, 3]  # short schedules skip nothing
    cache = TaylorCache(28)
    v = lambda step: torch.full((2,), 10.0 - step)  # noqa: E731 - a velocity changing linearly
    for step in range(28):
        if cache.needs(step):
            cache.record(step, v(step))
        else:
            assert torch.allclose(cache.predict(step), v(step))  # first order: exact on a line
    assert cache.calls == 13


# ---------------------------------------------------------------------------------------------------
# Through the gateway


@pytest.fixture(scope="module")
def lean_base(tmp_path_factory: pytest.TempPathFactory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("lean"), engine_transformer="lean")
    with running_server(settings) as url:
        yield url


def test_acceleration_through_the_openai_sdk(lean_base: str) -> None:
    client = openai.OpenAI(base_url=lean_base + "/v1", api_key="unused", max_retries=0, timeout=120)
    raw = client.images.with_raw_response.generate(
        model="kontext-tiny",
        prompt="a fox",
        size="64x48",
        response_format="b64_json",
        extra_body={"seed": 2, "num_inference_steps": 28, "acceleration": "high"},
    )
    body = raw.parse()
    img = open_image(base64.b64decode(body.data[0].b64_json))
    assert img.size == (64, 48) and img.format == "PNG"
    meta = raw.http_response.json()["metadata"]
    assert meta["engine"] == {
        "transformer": "lean",
        "attention": "sdpa",
        "acceleration": "high",
        "applied": ["step_cache"],
        "transformer_calls": 28,
        "transformer_computed": 13,
    }
    assert "acceleration" not in meta["ignored_params"]  # the step cache ran (fp8 is for GPUs)

    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(model="kontext-tiny", prompt="a fox", size="32x32", extra_body={"acceleration": "warp"})
    assert err.value.status_code == 400 and err.value.body["param"] == "acceleration"
    assert "none, regular, high" in err.value.body["message"]

    schema = client.get("/models/kontext-tiny?schema=true", cast_to=object)["schema"]
    accel = schema["modes"]["text-to-image"]["properties"]["acceleration"]
    assert accel["enum"] == ["high", "none", "regular"] and "local/kontext-tiny" in accel["x-providers"]
    client.close()
