"""The `kontext` command: --help, models, generate and edit (local runs, files written and decodable)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from PIL import Image

from conftest import png_bytes

KONTEXT = [sys.executable, "-m", "kontext_gateway"]


def kontext(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*KONTEXT, *args], capture_output=True, text=True, timeout=180, cwd=cwd)


def test_help_is_useful(tmp_path: Path) -> None:
    out = kontext("--help", cwd=tmp_path)
    assert out.returncode == 0
    for word in ("serve", "models", "generate", "edit", "KONTEXT_DATA_DIR", "DATABASE_URL"):
        assert word in out.stdout
    serve = kontext("serve", "--help", cwd=tmp_path)
    assert "--host" in serve.stdout and "--port" in serve.stdout and "--data-dir" in serve.stdout


def test_models_table(tmp_path: Path) -> None:
    out = kontext("models", cwd=tmp_path)
    assert out.returncode == 0
    assert "flux.1-kontext-pro" in out.stdout and "replicate/flux.1-kontext-pro 0.04" in out.stdout


def test_generate_and_edit(tmp_path: Path) -> None:
    out = kontext(
        "generate",
        "a red fox",
        "-o",
        str(tmp_path / "fox.webp"),
        "--size",
        "96x64",
        "--seed",
        "3",
        "--data-dir",
        str(tmp_path / "data"),
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    with Image.open(tmp_path / "fox.webp") as img:
        assert img.format == "WEBP" and img.size == (96, 64)
    assert "seed 3" in out.stdout

    (tmp_path / "in.png").write_bytes(png_bytes(80, 60))
    out = kontext(
        "edit",
        str(tmp_path / "in.png"),
        "make it night",
        "-o",
        str(tmp_path / "night.png"),
        "--size",
        "64x48",
        "-n",
        "2",
        "--data-dir",
        str(tmp_path / "data"),
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    for i in (1, 2):
        with Image.open(tmp_path / f"night-{i}.png") as img:
            assert img.size == (64, 48)


def test_errors_are_reported_in_words(tmp_path: Path) -> None:
    out = kontext(
        "generate",
        "x",
        "-o",
        str(tmp_path / "a.png"),
        "--model",
        "flux-kontext-prro",
        "--data-dir",
        str(tmp_path / "data"),
        cwd=tmp_path,
    )
    assert out.returncode == 1 and "Did you mean 'flux.1-kontext-pro'?" in out.stderr
    out = kontext("edit", str(tmp_path / "missing.png"), "x", "-o", str(tmp_path / "a.png"), cwd=tmp_path)
    assert out.returncode == 2 and "cannot read" in out.stderr
