"""The local engine's features on kontext-tiny: true CFG, several context images, masks, previews, the
context-latent cache, offload settings and the bounded model cache (LoRA: test_engine_lora.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from conftest import digest
from kontext_gateway.catalog import Catalog
from kontext_gateway.config import Settings
from kontext_gateway.engine.context import placements
from kontext_gateway.engine.pipeline import KontextEngine
from kontext_gateway.engine.previews import preview_steps
from kontext_gateway.errors import GatewayError
from kontext_gateway.params import Size, SizeRequest
from kontext_gateway.providers.base import ImageJob
from kontext_gateway.providers.local import LocalProvider


def run(engine: KontextEngine, **kw: Any) -> list[Image.Image]:
    args: dict[str, Any] = dict(prompt="a fox", output=Size(64, 64), steps=2, guidance=2.5, n=1, seed=1)
    args.update(kw)
    return engine.run(**args)


def picture(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


def pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im, dtype=np.float64)


class TransformerCalls:
    """Counts transformer passes and keeps the last pass's RoPE ids."""

    def __init__(self, engine: KontextEngine) -> None:
        self.calls = 0
        self.img_ids: Any = None
        self._handle = engine.pipe.transformer.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        self.calls += 1
        self.img_ids = kwargs["img_ids"].clone()

    def __enter__(self) -> TransformerCalls:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()


# -- 1. true CFG -------------------------------------------------------------------------------------


def test_true_cfg_runs_a_second_pass_and_changes_the_picture(engine: KontextEngine) -> None:
    with TransformerCalls(engine) as plain_calls:
        plain = digest(run(engine, steps=3))
    with TransformerCalls(engine) as cfg_calls:
        cfg = digest(run(engine, steps=3, negative_prompt="blurry, low quality", true_cfg_scale=4.0))
    assert cfg != plain and engine.last_run is not None and engine.last_run.true_cfg
    assert (plain_calls.calls, cfg_calls.calls) == (3, 6)  # diffusers' semantics: twice the passes
    # Inactive at scale 1, or without a negative prompt: the same bytes as a plain run.
    assert digest(run(engine, steps=3, negative_prompt="blurry, low quality", true_cfg_scale=1.0)) == plain
    assert digest(run(engine, steps=3, true_cfg_scale=4.0)) == plain
    assert digest(run(engine, steps=3, negative_prompt="another", true_cfg_scale=4.0)) != cfg


# -- 2. several input images -------------------------------------------------------------------------


def test_placements_follow_comfyui() -> None:
    assert placements([(4, 4)]) == [(1, 0, 0)] == placements([(4, 4)], "index")
    # offset: one canvas, each new reference below or to the right, whichever keeps it squarer
    assert placements([(4, 4)] * 4) == [(1, 0, 0), (1, 4, 0), (1, 0, 4), (1, 8, 0)]
    assert placements([(2, 6), (2, 6)]) == [(1, 0, 0), (1, 2, 0)]
    assert placements([(6, 2), (6, 2)]) == [(1, 0, 0), (1, 0, 2)]
    assert placements([(4, 4)] * 3, "index") == [(1, 0, 0), (2, 0, 0), (3, 0, 0)]


def test_one_image_is_unchanged_by_the_multi_image_path(engine: KontextEngine) -> None:
    red = picture(64, 64, 1)
    old_style = digest(run(engine, image=red, context=Size(64, 64)))
    assert digest(run(engine, images=[red], contexts=[Size(64, 64)])) == old_style
    assert engine.last_run is not None and engine.last_run.context_tokens == [16] and engine.last_run.noise_tokens == 16


def test_several_images_are_separate_context_tokens(engine: KontextEngine) -> None:
    inputs = [picture(64, 64, 1), picture(64, 48, 2), picture(48, 64, 3), picture(64, 64, 4)]
    sizes = [Size(64, 64), Size(64, 48), Size(48, 64), Size(64, 64)]
    out = {}
    for k in (1, 2, 4):
        with TransformerCalls(engine) as calls:
            out[k] = digest(run(engine, images=inputs[:k], contexts=sizes[:k]))
        info = engine.last_run
        assert info is not None
        expected = [(s.width // 16) * (s.height // 16) for s in sizes[:k]]  # 2x2 patches of the 1/8 latents
        assert info.context_tokens == expected
        assert calls.img_ids.shape[0] == info.noise_tokens + sum(expected)  # what the transformer saw
        ctx = calls.img_ids[info.noise_tokens :]
        assert (ctx[:, 0] == 1).all()  # offset placement: every reference on axis-0 index 1...
        cells = {(int(r), int(c)) for r, c in ctx[:, 1:].tolist()}
        assert len(cells) == sum(expected)  # ...tiled without overlapping on one canvas
    assert len(set(out.values())) == 3  # two and four images change the picture


def test_index_placement_numbers_the_references(engine: KontextEngine) -> None:
    inputs = [picture(64, 64, 1), picture(64, 64, 2)]
    with TransformerCalls(engine) as calls:
        by_index = digest(run(engine, images=inputs, contexts=[Size(64, 64)] * 2, placement="index"))
    ctx = calls.img_ids[16:]
    assert ctx[:16, 0].unique().tolist() == [1.0] and ctx[16:, 0].unique().tolist() == [2.0]
    assert by_index != digest(run(engine, images=inputs, contexts=[Size(64, 64)] * 2))


# -- 4. masks ----------------------------------------------------------------------------------------


def test_mask_repaints_only_where_it_is_set(engine: KontextEngine) -> None:
    from kontext_gateway.engine.masking import fit_mask

    src = picture(100, 50, 7)  # not the output size: the engine fits source and mask to it
    mask = Image.new("L", src.size, 0)
    mask.paste(255, (50, 0, 100, 50))  # repaint the right half
    previews: list[Image.Image] = []
    outs = [
        run(
            engine,
            images=[src],
            contexts=[Size(128, 64)],
            output=Size(128, 64),
            mask=mask,
            seed=s,
            steps=3,
            partial_images=1,
            preview=lambda i, im: previews.append(im),
        )[0]
        for s in (1, 2)
    ]
    assert [o.size for o in outs] == [(128, 64), (128, 64)] and len(previews) == 2
    assert engine.last_run is not None and engine.last_run.mode == "inpaint"
    assert engine.last_run.context_tokens == [32]  # the source is the context, as in diffusers
    fitted = pixels(src.resize((128, 64), Image.Resampling.LANCZOS))
    assert (np.asarray(fit_mask(mask, (128, 64)))[:, :63] == 0).all()
    a, b = pixels(outs[0]), pixels(outs[1])
    kept, repainted = np.s_[:, :60], np.s_[:, 68:]  # away from the feathered seam at x = 64
    assert np.abs(a[kept] - fitted[kept]).max() == 0  # the source's own pixels
    assert np.abs(a[repainted] - fitted[repainted]).mean() > 20
    assert np.abs(a[kept] - b[kept]).max() == 0 and np.abs(a[repainted] - b[repainted]).mean() > 5  # seeds
    assert np.abs(pixels(previews[0])[kept] - fitted[kept]).max() == 0  # previews show it the same way


def test_mask_keeps_the_unmasked_latents_too(engine: KontextEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the pixels are put back, the pipeline itself keeps the unmasked area in latent space.
    kontext-tiny's random VAE decodes those latents into another picture than the source (and its
    GroupNorm layers let every pixel feel the whole latent), so this is measured across seeds: the
    kept half stays (almost) put while the repainted half is drawn anew."""
    import kontext_gateway.engine.masking as masking

    monkeypatch.setattr(masking, "keep_unmasked", lambda result, source, mask: result)
    src = picture(128, 64, 7)
    mask = Image.new("L", src.size, 0)
    mask.paste(255, (64, 0, 128, 64))
    a, b = (
        pixels(run(engine, images=[src], contexts=[Size(128, 64)], output=Size(128, 64), mask=mask, seed=s, steps=3)[0])
        for s in (1, 2)
    )
    kept, repainted = np.s_[:, :64], np.s_[:, 64:]
    assert np.abs(a[kept] - b[kept]).mean() < 0.3 * np.abs(a[repainted] - b[repainted]).mean()


def test_mask_with_a_further_reference_image(engine: KontextEngine) -> None:
    src, ref = picture(64, 64, 1), picture(64, 64, 2)
    mask = Image.new("L", (64, 64), 255)
    alone = digest(run(engine, images=[src], contexts=[Size(64, 64)], mask=mask))
    with_ref = digest(run(engine, images=[src, ref], contexts=[Size(64, 64)] * 2, mask=mask))
    assert engine.last_run is not None and engine.last_run.context_tokens == [16, 16]
    assert with_ref != alone
    with pytest.raises(GatewayError) as err:
        run(engine, mask=mask)
    assert err.value.status == 400


# -- 5. previews -------------------------------------------------------------------------------------


def test_preview_steps_are_evenly_spaced_before_the_last() -> None:
    assert preview_steps(28, 3) == [7, 14, 21]
    assert preview_steps(4, 2) == [1, 3]
    assert preview_steps(4, 1) == [2]
    assert preview_steps(2, 3) == [1]  # fewer steps than previews: fewer previews
    assert preview_steps(1, 2) == [] and preview_steps(10, 0) == []


def test_previews_arrive_before_the_result(engine: KontextEngine) -> None:
    events: list[tuple[str, Any]] = []
    result = run(
        engine,
        steps=4,
        output=Size(96, 48),
        partial_images=2,
        preview=lambda i, im: events.append(("preview", (i, im.size, im.mode))),
        progress=lambda step, total: events.append(("step", step)),
    )
    events.append(("result", result[0].size))
    assert events == [
        ("step", 1),
        ("preview", (0, (96, 48), "RGB")),
        ("step", 2),
        ("step", 3),
        ("preview", (1, (96, 48), "RGB")),
        ("step", 4),
        ("result", (96, 48)),
    ]
    assert engine.last_run is not None and engine.last_run.previews == 2
    # Previews read the run's tensors and change nothing in it.
    assert digest(result) == digest(run(engine, steps=4, output=Size(96, 48)))


def test_a_failing_preview_consumer_does_not_fail_the_picture(engine: KontextEngine) -> None:
    def boom(i: int, im: Image.Image) -> None:
        raise ConnectionError("client gone")

    assert digest(run(engine, steps=4, partial_images=3, preview=boom)) == digest(run(engine, steps=4))


# -- 7. context-latent cache -------------------------------------------------------------------------


def test_context_latents_are_cached_for_iterative_edits(engine: KontextEngine) -> None:
    cache = engine.context_cache
    src = picture(64, 64, 99)
    before = (cache.stats.hits, cache.stats.misses)
    first = digest(run(engine, images=[src], contexts=[Size(64, 64)]))
    assert (cache.stats.hits, cache.stats.misses) == (before[0], before[1] + 1)
    second = digest(run(engine, images=[src.copy()], contexts=[Size(64, 64)], seed=1))
    assert (cache.stats.hits, cache.stats.misses) == (before[0] + 1, before[1] + 1) and second == first
    run(engine, images=[src], contexts=[Size(48, 48)])  # another size is another entry
    assert cache.stats.misses == before[1] + 2
    assert len(cache) <= cache.max_entries


# -- 6. memory ---------------------------------------------------------------------------------------


def test_offload_is_ignored_on_cpu() -> None:
    tiny = KontextEngine.tiny("cpu", offload="model")
    assert tiny.offload == "none"
    assert run(tiny)[0].size == (64, 64)


class FakeEngine:
    def __init__(self, key: str) -> None:
        self.key = key
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_model_cache_unloads_the_least_recently_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    provider = LocalProvider(Settings(data_dir=tmp_path, engine_max_models=2))
    made: list[FakeEngine] = []

    def load(entry: Any) -> FakeEngine:
        made.append(FakeEngine(entry.config_key))
        return made[-1]

    monkeypatch.setattr(provider, "_load", load)
    a, b, c = (_entry(k) for k in ("local/a", "local/b", "local/c"))
    ea = provider.engine(a)
    provider.engine(b)
    assert provider.engine(a) is ea and len(made) == 2  # loaded once, then reused
    provider.engine(c)  # b is the least recently used
    assert provider.loaded_models() == ["local/a", "local/c"]
    assert [e.closed for e in made] == [False, True, False]
    provider.engine(b)  # loads again, unloading a
    assert provider.loaded_models() == ["local/c", "local/b"] and made[0].closed and len(made) == 4


def _entry(key: str) -> Any:
    from kontext_gateway.catalog import ProviderEntry

    return ProviderEntry.model_validate(
        {
            "provider": "local",
            "config_key": key,
            "provider_model_id": key,
            "max_input_images": 4,
            "pricing": {"source": "test", "currency": "USD", "components": []},
        }
    )


# -- the provider ------------------------------------------------------------------------------------


def _job(images: list[Image.Image], **kw: Any) -> ImageJob:
    model = Catalog.load().get("kontext-tiny")
    args: dict[str, Any] = dict(
        request_id="req_t",
        model=model,
        mode="edit" if images else "text-to-image",
        prompt="a fox",
        images=images,
        size=SizeRequest(Size(64, 64), exact=True),
        n=1,
        seed=3,
        output_format="png",
        output_compression=None,
        steps=2,
    )
    args.update(kw)
    return ImageJob(**args)


def test_provider_handles_the_new_parameters(tmp_path: Path, engine: KontextEngine) -> None:
    provider = LocalProvider(Settings(data_dir=tmp_path))
    catalog = Catalog.load()
    entry = next(p for p in catalog.get("kontext-tiny").providers if p.provider == "local")
    handling = provider.handling(entry)
    assert {"negative_prompt", "true_cfg_scale", "loras", "mask", "partial_images"} <= set(handling)
    assert entry.max_input_images == 4
    imgs = [picture(64, 64, i) for i in range(5)]
    assert provider.unsupported(entry, _job(imgs[:4])) is None
    too_many = provider.unsupported(entry, _job(imgs))
    assert too_many is not None and "at most 4" in too_many.reason and too_many.param == "image"
    lone_mask = provider.unsupported(entry, _job([], mask=Image.new("L", (64, 64))))
    assert lone_mask is not None and "mask" in lone_mask.reason and lone_mask.param == "mask"

    provider._engines[entry.config_key] = engine  # the module's engine: no second build
    previews: list[int] = []
    job = _job(
        imgs[:2],
        negative_prompt="dull",
        true_cfg_scale=3.0,
        partial_images=1,
        preview=lambda i, im: previews.append(i),
        extra={"my_option": 1},
    )
    result = provider._generate_sync(entry, job)
    assert result.size == Size(64, 64) and result.ignored_params == ["my_option"] and previews == [0]
    info = engine.last_run
    assert info is not None and info.true_cfg and len(info.context_tokens) == 2
    # The same features given among the extra parameters are used, and not reported as ignored.
    via_extra = provider._generate_sync(
        entry, _job(imgs[:2], extra={"negative_prompt": "dull", "true_cfg_scale": 3, "my_option": 1})
    )
    assert via_extra.ignored_params == ["my_option"]
    assert via_extra.images[0].image.tobytes() == result.images[0].image.tobytes()
