"""imaging: what a client sees when it uploads images and gets them back."""

from __future__ import annotations

import base64
import io
import random
import struct
import zlib

import pytest
from PIL import Image, ImageFile

from kontext_gateway.errors import GatewayError
from kontext_gateway.imaging import (
    EXTENSIONS,
    MIME_TYPES,
    OUTPUT_FORMATS,
    decode_image,
    encode_image,
    inspect_image,
    parse_data_url,
    sniff_format,
)

PIL_NAMES = {"png": "PNG", "jpeg": "JPEG", "gif": "GIF", "webp": "WEBP", "avif": "AVIF"}
LIMIT = 10_000_000


def gradient(size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A busy RGB image, so lossy quality visibly changes the output size."""
    w, h = size
    pixels = bytes((x * 7 + y * 13 + c * 50) % 256 for y in range(h) for x in range(w) for c in range(3))
    return Image.frombytes("RGB", size, pixels)


def saved(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR says width x height (CRC fixed), so only the header is huge."""
    data = bytearray(saved(Image.new("RGB", (1, 1)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def decode_error(data: bytes, **kwargs: object) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        decode_image(data, max_pixels=LIMIT, **kwargs)  # type: ignore[arg-type]
    return info.value


# -- tables ------------------------------------------------------------------------------------------


def test_tables_cover_every_output_format() -> None:
    assert OUTPUT_FORMATS == ("png", "jpeg", "gif", "webp", "avif")
    assert {f: f"image/{f}" for f in OUTPUT_FORMATS} == MIME_TYPES
    assert EXTENSIONS == {"png": "png", "jpeg": "jpg", "gif": "gif", "webp": "webp", "avif": "avif"}


def test_truncated_images_are_not_silently_accepted() -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# -- encode -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
def test_encode_round_trips_format_and_size(fmt: str) -> None:
    data = encode_image(gradient(), fmt)
    with Image.open(io.BytesIO(data)) as reopened:
        assert reopened.format == PIL_NAMES[fmt]
        assert reopened.size == (64, 48)
    assert sniff_format(data) == fmt


@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
@pytest.mark.parametrize("compression", [None, 50])
def test_encode_is_deterministic(fmt: str, compression: int | None) -> None:
    image = gradient()
    assert encode_image(image, fmt, compression=compression) == encode_image(image, fmt, compression=compression)


@pytest.mark.parametrize("fmt", ["jpeg", "webp", "avif"])
def test_compression_sets_lossy_quality(fmt: str) -> None:
    image = gradient((128, 96))
    assert len(encode_image(image, fmt, compression=10)) < len(encode_image(image, fmt, compression=95))


@pytest.mark.parametrize("fmt", ["png", "gif"])
def test_compression_is_ignored_for_lossless(fmt: str) -> None:
    image = gradient()
    default = encode_image(image, fmt)
    assert encode_image(image, fmt, compression=10) == encode_image(image, fmt, compression=95) == default


def test_encode_drops_metadata_and_leaves_input_alone() -> None:
    image = gradient()
    image.info = {"icc_profile": b"not a profile", "comment": b"secret"}
    data = encode_image(image, "png")
    with Image.open(io.BytesIO(data)) as reopened:
        assert "icc_profile" not in reopened.info and "comment" not in reopened.info
    assert data == encode_image(gradient(), "png")
    assert image.info["comment"] == b"secret"


def test_encode_gif_is_palette_and_jpeg_accepts_rgba() -> None:
    with Image.open(io.BytesIO(encode_image(gradient(), "gif"))) as reopened:
        assert reopened.mode == "P"
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 128))
    with Image.open(io.BytesIO(encode_image(rgba, "jpeg"))) as reopened:
        assert reopened.mode == "RGB"


@pytest.mark.parametrize(
    ("fmt", "compression"), [("tiff", None), ("jpg", None), ("PNG", None), ("jpeg", 101), ("webp", -1)]
)
def test_encode_rejects_bad_arguments(fmt: str, compression: int | None) -> None:
    with pytest.raises(ValueError):
        encode_image(gradient(), fmt, compression=compression)


# -- sniff --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (saved(Image.new("RGB", (4, 4)), "BMP"), None),
        (saved(Image.new("RGB", (4, 4)), "TIFF"), None),
        (b"%PDF-1.7\n", None),
        (b"hello world", None),
        (b"", None),
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", None),
        (b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom", None),
    ],
)
def test_sniff_rejects_other_files(data: bytes, expected: None) -> None:
    assert sniff_format(data) is expected


# -- decode: happy paths ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_decode_accepted_formats_to_rgb(fmt: str) -> None:
    image = decode_image(saved(gradient(), fmt), max_pixels=LIMIT)
    assert image.mode == "RGB" and image.size == (64, 48)
    image.getpixel((0, 0))  # fully loaded: usable with the source bytes gone


def test_decode_exif_orientation() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    image = decode_image(saved(Image.new("RGB", (40, 20), "red"), "JPEG", exif=exif), max_pixels=LIMIT)
    assert image.size == (20, 40)


def test_decode_gif_takes_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    data = saved(frames[0], "GIF", save_all=True, append_images=frames[1:])
    with Image.open(io.BytesIO(data)) as check:
        assert check.n_frames == 2
    image = decode_image(data, max_pixels=LIMIT)
    assert image.getpixel((4, 4)) == (255, 0, 0)


CLEAR = Image.new("RGBA", (4, 4), (0, 0, 0, 0))


@pytest.mark.parametrize(
    ("transparent", "fmt", "params"),
    [
        (CLEAR, "PNG", {}),
        (Image.new("LA", (4, 4), (0, 0)), "PNG", {}),
        (CLEAR.convert("P"), "PNG", {}),  # palette with a transparent entry (tRNS)
        (Image.new("RGB", (4, 4), (9, 9, 9)), "PNG", {"transparency": (9, 9, 9)}),  # RGB colour key (tRNS)
        (CLEAR, "WEBP", {}),
        (Image.new("P", (4, 4), 0), "GIF", {"transparency": 0}),  # GIF transparent index
    ],
    ids=["png-rgba", "png-la", "png-p", "png-rgb-key", "webp-rgba", "gif-p"],
)
def test_decode_composites_transparency_over_white(
    transparent: Image.Image, fmt: str, params: dict[str, object]
) -> None:
    image = decode_image(saved(transparent, fmt, **params), max_pixels=LIMIT)
    assert image.mode == "RGB"
    assert image.getextrema() == ((255, 255), (255, 255), (255, 255))  # every pixel white


def test_decode_half_transparent_blends_with_white() -> None:
    image = decode_image(saved(Image.new("RGBA", (2, 2), (0, 0, 0, 128)), "PNG"), max_pixels=LIMIT)
    assert all(126 <= c <= 128 for c in image.getpixel((0, 0)))


def test_decode_exactly_at_the_limit_is_fine() -> None:
    assert decode_image(saved(Image.new("1", (100, 100)), "PNG"), max_pixels=10_000).size == (100, 100)


# -- decode: errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_decode_truncated_is_invalid_image(fmt: str) -> None:
    data = saved(gradient((128, 96)), fmt)
    error = decode_error(data[: len(data) // 2], param="image[]")
    assert (error.status, error.code, error.param) == (400, "invalid_image", "image[]")


def test_decode_corrupt_png_crc_is_invalid_image() -> None:
    data = bytearray(saved(gradient(), "PNG"))
    data[40] ^= 0xFF  # inside the IDAT payload: the chunk CRC no longer matches
    assert decode_error(bytes(data)).code == "invalid_image"


def test_decode_magic_only_is_invalid_image() -> None:
    assert decode_error(b"\x89PNG\r\n\x1a\n" + random.Random(1).randbytes(64)).code == "invalid_image"


@pytest.mark.parametrize(
    "data",
    [
        saved(Image.new("RGB", (4, 4)), "BMP"),
        saved(Image.new("RGB", (4, 4)), "TIFF"),
        saved(Image.new("RGB", (4, 4)), "PDF"),
        encode_image(Image.new("RGB", (4, 4)), "avif"),
        b"just some text",
        random.Random(2).randbytes(256),
        b"",
    ],
    ids=["bmp", "tiff", "pdf", "avif", "text", "random", "empty"],
)
def test_decode_unsupported_format(data: bytes) -> None:
    error = decode_error(data, param="mask")
    assert (error.status, error.code, error.param) == (400, "unsupported_image_format", "mask")
    assert "PNG" in error.message and "JPEG" in error.message and "WebP" in error.message


@pytest.mark.parametrize(
    ("data", "size_text"),
    [
        (png_claiming(5000, 5000), "5000x5000"),  # over our limit, under Pillow's own warning threshold
        (png_claiming(20000, 20000), "400000000"),  # past Pillow's DecompressionBombError threshold
        (saved(Image.new("1", (20000, 20000)), "PNG"), "400000000"),  # a real, tiny-on-disk bomb
        (png_claiming(10000, 10000), "100000000"),  # Pillow's DecompressionBombWarning range
    ],
    ids=["patched-5000", "patched-20000", "real-20000", "patched-10000"],
)
def test_decode_too_many_pixels(data: bytes, size_text: str) -> None:
    error = decode_error(data)
    assert (error.status, error.code, error.param) == (400, "image_too_large", "image")
    assert size_text in error.message and str(LIMIT) in error.message


def test_decode_pillow_bomb_warning_is_an_error_even_under_a_high_limit() -> None:
    # 100M pixels is over Pillow's MAX_IMAGE_PIXELS (~89M): a warning in Pillow, an error here.
    with pytest.raises(GatewayError) as info:
        decode_image(png_claiming(10000, 10000), max_pixels=150_000_000)
    assert info.value.code == "image_too_large"


# -- data URLs ----------------------------------------------------------------------------------------


def test_parse_data_url_round_trip() -> None:
    png = saved(gradient(), "PNG")
    encoded = base64.b64encode(png).decode()
    assert parse_data_url(f"data:image/png;base64,{encoded}") == png
    wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    assert parse_data_url(f"DATA:image/png;BASE64,{wrapped}") == png
    assert decode_image(parse_data_url(f"data:image/png;base64,{encoded}"), max_pixels=LIMIT).size == (64, 48)


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/cat.png",
        "data:image/png;base64",  # no comma
        "data:image/svg+xml,<svg/>",  # not base64
        "data:image/png;base64,",  # empty payload
        "data:image/png;base64,not*base64!",
        "data:image/png;base64,aGVsbG8",  # bad padding
        "data:image/png;base64,aGVsbG8=é",
        "",
    ],
)
def test_parse_data_url_errors(url: str) -> None:
    with pytest.raises(GatewayError) as info:
        parse_data_url(url, param="image_url")
    assert (info.value.status, info.value.code, info.value.param) == (400, "invalid_image_url", "image_url")


# -- inspect: results passed on as they are, checked whole without decoding ---------------------------


def inspect_error(data: bytes, **kwargs: object) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        inspect_image(data, max_pixels=LIMIT, **kwargs)  # type: ignore[arg-type]
    return info.value


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_inspect_gives_the_format_and_size_decode_gives(fmt: str) -> None:
    data = saved(gradient((128, 96)), fmt)
    assert inspect_image(data, max_pixels=LIMIT) == (sniff_format(data), decode_image(data, max_pixels=LIMIT).size)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_inspect_applies_exif_orientation_like_decode(fmt: str) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    data = saved(Image.new("RGB", (40, 20), "red"), fmt, exif=exif)
    assert inspect_image(data, max_pixels=LIMIT)[1] == decode_image(data, max_pixels=LIMIT).size == (20, 40)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
@pytest.mark.parametrize("cut", ["half", "last-bytes"])
def test_inspect_refuses_a_truncated_file(fmt: str, cut: str) -> None:
    data = saved(gradient((128, 96)), fmt)
    data = data[: len(data) // 2] if cut == "half" else data[:-3]
    error = inspect_error(data, param="output")
    assert (error.status, error.code, error.param) == (400, "invalid_image", "output")
    if cut == "half":  # a PNG missing only its end chunk still decodes: inspect is the stricter
        assert decode_error(data).code == "invalid_image"


def test_inspect_refuses_a_png_whose_crc_does_not_match() -> None:
    data = bytearray(saved(gradient(), "PNG"))
    data[40] ^= 0xFF  # inside the IDAT payload
    assert inspect_error(bytes(data)).code == "invalid_image"


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"\x89PNG\r\n\x1a\n" + random.Random(1).randbytes(64), "invalid_image"),
        (saved(Image.new("RGB", (4, 4)), "BMP"), "unsupported_image_format"),
        (encode_image(Image.new("RGB", (4, 4)), "avif"), "unsupported_image_format"),
        (b"", "unsupported_image_format"),
        (png_claiming(5000, 5000), "image_too_large"),
        (png_claiming(20000, 20000), "image_too_large"),
        (saved(Image.new("1", (20000, 20000)), "PNG"), "image_too_large"),
    ],
    ids=["magic-only", "bmp", "avif", "empty", "patched-5000", "patched-20000", "real-20000"],
)
def test_inspect_refuses_what_decode_refuses(data: bytes, code: str) -> None:
    assert inspect_error(data).code == decode_error(data).code == code
