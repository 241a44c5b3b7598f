"""Settings: provider variables under their own names, a TOML config file, secrets kept out of repr."""

from __future__ import annotations

from pathlib import Path

import pytest

from kontext_gateway.config import Settings


def test_provider_variables_and_database_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPLICATE_API_TOKEN", "r8_secret_value")
    monkeypatch.setenv("FAL_BASE_URL", "http://127.0.0.1:9/")
    monkeypatch.setenv("DATABASE_URL", "postgres://me@db/kontext")
    monkeypatch.setenv("KONTEXT_PROVIDER_PRIORITY", '{"fal": -1}')
    s = Settings()
    assert s.replicate_api_token is not None and s.replicate_api_token.get_secret_value() == "r8_secret_value"
    assert "r8_secret_value" not in repr(s) and "r8_secret_value" not in str(s.model_dump())
    assert s.fal_base_url == "http://127.0.0.1:9/" and s.provider_priority == {"fal": -1}
    assert s.resolved_database_url() == "postgresql+asyncpg://me@db/kontext"


def test_config_file_under_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "kontext.toml"
    config.write_text(
        'fal_key = "file-key"\nbfl_api_key = "file-bfl"\nupstream_retries = 4\n[provider_priority]\nbfl = -1\n'
    )
    monkeypatch.setenv("KONTEXT_CONFIG", str(config))
    monkeypatch.setenv("BFL_API_KEY", "env-bfl")
    s = Settings()
    assert s.fal_key.get_secret_value() == "file-key"  # type: ignore[union-attr]
    assert s.bfl_api_key.get_secret_value() == "env-bfl"  # type: ignore[union-attr]  # environment wins
    assert s.upstream_retries == 4 and s.provider_priority == {"bfl": -1}
    assert Settings(upstream_retries=1).upstream_retries == 1  # arguments win over both


def test_missing_config_file_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KONTEXT_CONFIG", "/nonexistent/kontext.toml")
    with pytest.raises(FileNotFoundError, match="KONTEXT_CONFIG"):
        Settings()
