"""Settings: one object, read from the environment (prefix `KONTEXT_`) and CLI flags, passed down."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

MIB = 1024 * 1024


def _env(name: str) -> AliasChoices:
    """Accept a field by its own name (constructor) or by the provider's variable name (environment)."""
    return AliasChoices(name.lower(), name)


# What `rate_limit_url` and `provider_health_url` take: state kept per process ("memory"), or shared by
# every gateway process through Redis or PostgreSQL (these schemes).
POSTGRES_SCHEMES = ("postgresql://", "postgres://", "postgresql+asyncpg://")
SHARED_STATE_URLS = "'memory', 'redis://', 'postgresql://' (or 'postgres://', 'postgresql+asyncpg://')"


def default_data_dir() -> Path:
    return Path(os.environ.get("KONTEXT_DATA_DIR") or Path.cwd() / "data")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KONTEXT_", extra="ignore")

    host: str = "127.0.0.1"
    # The model used when a request names none (OpenAI clients may omit `model`).
    default_model: str = "kontext-tiny"
    # Another catalog file instead of the built-in one (same format as catalog/models.toml).
    catalog_path: Path | None = None
    port: int = 8000
    data_dir: Path = Field(default_factory=default_data_dir)
    # SQLite under data_dir unless set; `postgresql://...` switches to PostgreSQL.
    # `DATABASE_URL` (no prefix) is honoured too, as most deployments set it.
    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("database_url", "DATABASE_URL", "KONTEXT_DATABASE_URL")
    )
    # Public base URL used in signed image links; by default, the URL the request came in on (its
    # Host is one of the allowed hosts below, so a forged Host cannot end up in a link).
    public_url: str | None = None
    # Host names (and optional :port) this gateway answers to; others get 400 (what DNS rebinding
    # sends). "*.example.com" matches subdomains, "*" any host. Always allowed besides these: the
    # host of `public_url`, and on a loopback bind localhost, 127.0.0.1 and [::1] (any port).
    # Comma-separated in the environment: KONTEXT_ALLOWED_HOSTS=images.example.com,10.0.0.7
    allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Browser origins of other sites that may call the API (scheme://host[:port]); CORS preflights
    # are answered for them. Requests from any other site's pages are refused (403). Comma-separated.
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Secret for signing blob URLs; generated once and kept in data_dir/secret.key when unset.
    url_secret: str | None = None
    url_ttl_seconds: int = 3600
    # Where images and uploaded files are kept: unset, the folder data_dir/blobs; "s3://bucket/prefix",
    # S3-compatible object storage (credentials and endpoint: the standard AWS_* variables, see
    # store/s3blobs.py).
    blob_url: str | None = None
    # The image links responses carry, valid url_ttl_seconds: "gateway", this gateway's signed
    # /v1/blobs/ links (it serves them from the store); "presigned", the object store's presigned
    # URLs (clients fetch from the store itself; needs blob_url).
    blob_links: Literal["gateway", "presigned"] = "gateway"

    # Local engine. [dev] weights in diffusers layout; unset means [dev] is not served locally.
    dev_weights_dir: Path | None = None
    # Never fetch weights from a hub unless this is set.
    allow_downloads: bool = False
    device: str | None = None  # "cuda", "cpu"; default: cuda when available
    engine_threads: int | None = Field(default=None, ge=1)  # CPU threads for torch; default: torch's own
    # LoRA adapters named in requests (`loras: [{"path": ...}]`) are files under this directory.
    lora_dir: Path | None = None
    # Smaller GPUs: "model" moves each component to the GPU only while it runs (diffusers' model CPU
    # offload), "sequential" each layer (slowest, least memory); "none" keeps everything on the device.
    engine_offload: Literal["none", "model", "sequential"] = "none"
    # Local models kept loaded at once; the least recently used is unloaded to make room.
    engine_max_models: int = Field(default=2, ge=1)
    # The transformer the local engine runs: "lean" (ours: fused layout, per-request precomputation,
    # fp8 and step caching for `acceleration`), or "diffusers" (the reference; LoRA adapters need it).
    engine_transformer: Literal["diffusers", "lean"] = "diffusers"
    # Attention kernel of the lean transformer: "auto" picks FlashAttention 3 on Hopper when installed,
    # else cuDNN attention on CUDA, else PyTorch SDPA.
    engine_attention: Literal["auto", "sdpa", "cudnn", "flash", "flash3"] = "auto"
    # torch.compile the lean transformer's blocks (first request per image size compiles: minutes).
    engine_compile: bool = False

    # Upstream providers: credentials and base URLs (scheme and host, as the providers' own clients
    # take them) under the providers' own variable names. Secrets never reach logs or responses.
    replicate_api_token: SecretStr | None = Field(default=None, validation_alias=_env("REPLICATE_API_TOKEN"))
    fal_key: SecretStr | None = Field(default=None, validation_alias=_env("FAL_KEY"))
    fireworks_api_key: SecretStr | None = Field(default=None, validation_alias=_env("FIREWORKS_API_KEY"))
    bfl_api_key: SecretStr | None = Field(default=None, validation_alias=_env("BFL_API_KEY"))
    replicate_base_url: str = Field(default="https://api.replicate.com", validation_alias=_env("REPLICATE_BASE_URL"))
    fal_base_url: str = Field(default="https://queue.fal.run", validation_alias=_env("FAL_BASE_URL"))
    fireworks_base_url: str = Field(default="https://api.fireworks.ai", validation_alias=_env("FIREWORKS_BASE_URL"))
    bfl_base_url: str = Field(default="https://api.bfl.ai", validation_alias=_env("BFL_BASE_URL"))
    # fal's file storage, where input images too large to inline are uploaded (with FAL_KEY).
    fal_storage_url: str = Field(default="https://rest.fal.ai", validation_alias=_env("FAL_STORAGE_URL"))

    # Routing and resilience.
    upstream_timeout_s: float = 300.0  # one upstream task: submit, polls and download
    request_timeout_s: float = 900.0  # a whole request, across retries and failover
    upstream_retries: int = Field(default=2, ge=0)  # retries on the same provider before failing over
    # Polling a submitted task: at once, then after `upstream_first_poll_s`, then each wait 1.5x the
    # last, up to `upstream_poll_interval_s` (0, 0.05, 0.075, 0.11, ... 1.0 s: a task done at once is
    # seen at once, a fast one within tens of milliseconds, a slow one costs about one poll a second).
    upstream_first_poll_s: float = Field(default=0.05, ge=0)
    upstream_poll_interval_s: float = Field(default=1.0, ge=0)
    upstream_backoff_s: float = 0.5  # first retry delay; doubles, with full jitter
    upstream_backoff_max_s: float = 8.0
    breaker_failures: int = Field(default=5, ge=1)  # consecutive failures that open a breaker
    breaker_reset_s: float = 30.0  # how long an open breaker waits before letting a probe through
    # Where breakers and the latencies that order routes are kept: "memory" (each process learns on its
    # own), "redis://..." or "postgresql://..." (a database the gateway has migrated, normally its own)
    # so that every process opens and closes a breaker together. See provider_health/shared.py.
    provider_health_url: str | None = None
    # Lower priority first (default 0); within a priority, cheapest, then fastest observed; weights
    # share load between otherwise equal providers. JSON in the environment, e.g. '{"fal": -1}'.
    provider_priority: dict[str, int] = Field(default_factory=dict)
    provider_weights: dict[str, float] = Field(default_factory=dict)
    # Active upstream tasks per provider (or provider/model id); above it requests queue.
    provider_concurrency: dict[str, int] = Field(default_factory=dict)
    # Origins besides a provider's own that may receive its key (a regional mirror, an egress proxy, a
    # test double): JSON, e.g. '{"bfl": ["https://bfl-mirror.internal"]}'. Exact scheme, host and port.
    provider_hosts: dict[str, list[str]] = Field(default_factory=dict)

    # Jobs: every request is a row that workers claim (see jobs/), in two lanes. `workers`: hosted jobs
    # one process runs at once (each mostly waits on its upstream, so hundreds cost little); 0: this
    # process only serves the API and other processes, e.g. `kontext worker`, run the jobs of both
    # lanes. `local_workers`: local-engine jobs it holds at once (the engine runs one at a time; 0:
    # this process runs no local jobs, e.g. a worker without the weights).
    workers: int = Field(default=256, ge=0)
    local_workers: int = Field(default=1, ge=0)
    job_lease_s: float = 30.0  # a claimed job whose worker stops renewing is taken up again after this
    job_poll_interval_s: float = 0.5  # how often idle workers look for jobs enqueued by other processes
    # On SIGTERM a process stops taking jobs, gives the running ones this long to finish, then hands
    # the rest back to the queue (leases released: another worker resumes them, nothing resubmitted).
    drain_timeout_s: float = Field(default=30.0, ge=0)
    idempotency_ttl_s: float = 86400.0  # how long an Idempotency-Key names its request
    webhook_sweep_interval_s: float = 30.0  # how often ended jobs are checked for a lost completed webhook

    # Outbound URLs (webhooks, input images by URL) that resolve to loopback, private, link-local or
    # metadata addresses are refused unless this is set: on, the gateway can be made to reach them.
    allow_private_urls: bool = Field(
        default=False, validation_alias=AliasChoices("allow_private_urls", "KONTEXT_ALLOW_PRIVATE_URLS")
    )
    # One outbound fetch of an input image by URL, from connect to last byte (a trickling server
    # cannot hold a request longer than this).
    fetch_timeout_s: float = Field(default=30.0, gt=0)

    # Webhooks (Standard Webhooks signing). The secret is `whsec_` + base64 of random bytes; generated
    # once and kept in data_dir/webhook_secret when unset.
    webhook_secret: SecretStr | None = None
    # Delays before each retry of a terminal (`completed`) delivery, ±jitter: 10 attempts over about
    # 15 hours. Other events are sent once.
    webhook_retry_delays_s: list[float] = Field(
        default_factory=lambda: [5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0]
    )
    webhook_retry_jitter: float = Field(default=0.2, ge=0, le=1)  # a fraction of each delay
    webhook_timeout_s: float = Field(default=15.0, gt=0)  # one delivery; Standard Webhooks: 15-30 s
    webhook_poll_interval_s: float = Field(default=1.0, gt=0)  # looking for deliveries due (retries, other processes)
    webhook_concurrency: int = Field(default=8, ge=1)  # deliveries in flight per process (one per prediction)

    # Accounts. Keys live in the database (`kontext keys create`); this one extra key, from the
    # environment, is an admin key that needs no database row (for bootstrapping and automation).
    admin_key: SecretStr | None = None
    # Where per-key rate limits are counted: "memory" (this process), "redis://..." or
    # "postgresql://..." so that several gateway processes share them.
    rate_limit_url: str | None = None

    # Payload retention (history): "full" keeps prompts and images `payload_retention_days` after a
    # request ends (None: forever); "metadata" purges them once the job has ended and its links have
    # expired (`url_ttl_seconds` after completion), and the history never shows prompts. Cost, status,
    # timings and attempts are always kept. The processes that run jobs sweep every interval.
    payload_retention: Literal["full", "metadata"] = "full"
    payload_retention_days: float | None = Field(default=None, gt=0)
    retention_sweep_interval_s: float = Field(default=300.0, gt=0)

    # Limits on what a request may carry.
    max_body_bytes: int = 256 * MIB
    max_file_bytes: int = 50 * MIB
    max_input_pixels: int = 8192 * 8192  # decoded pixel limit against decompression bombs
    max_n: int = 10
    # Output pixels (n x width x height) one request may ask of a hosted provider, and of the local
    # engine (default: 4 megapixels on a CPU, 16 on a GPU). See pixel_budget.py.
    max_request_pixels: int = Field(default=10 * 2048 * 2048, ge=1)
    local_max_request_pixels: int | None = Field(default=None, ge=1)

    @field_validator("allowed_hosts", "cors_origins", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        """A comma-separated string (the environment's form), a JSON list, or a list."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Constructor arguments, then the environment, then the TOML file named by KONTEXT_CONFIG
        (same keys as the fields, e.g. `fal_key = "..."`, `[provider_priority]`)."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("KONTEXT_CONFIG")
        if config_file:
            if not Path(config_file).is_file():
                raise FileNotFoundError(f"KONTEXT_CONFIG names {config_file}, which is not a file")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        return tuple(sources)

    def binds_loopback(self) -> bool:
        """Whether `host` (the address served on) is reachable from this machine only."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False  # a host name: may be reachable from elsewhere

    def local_lane(self, hosted: int) -> int:
        """Local-engine jobs a process with `hosted` hosted slots holds at once. No hosted slots means
        an API-only process, unless local_workers was set explicitly: a worker for the engine alone
        (`kontext worker --concurrency 0 --local-workers 1`, one per GPU)."""
        if hosted or "local_workers" in self.model_fields_set:
            return self.local_workers
        return 0

    def resolved_database_url(self) -> str:
        url = self.database_url or f"sqlite:///{self.data_dir / 'kontext.db'}"
        # One async driver per backend, whichever spelling the user gave.
        if url.startswith("postgres://"):
            url = "postgresql://" + url[len("postgres://") :]
        if url.startswith(("postgresql://", "postgresql+psycopg2://")):
            url = "postgresql+asyncpg://" + url.split("://", 1)[1]
        if url.startswith("sqlite://") and not url.startswith("sqlite+aiosqlite://"):
            url = "sqlite+aiosqlite://" + url[len("sqlite://") :]
        return url

    def resolved_url_secret(self) -> bytes:
        if self.url_secret:
            return self.url_secret.encode()
        path = self.data_dir / "secret.key"
        if not path.exists():
            # Often the first thing made in the data dir: private from the start (Gateway.start keeps it so).
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Written whole to a private (0600) temp file, then linked into place: two processes starting
            # at once agree on one secret, and neither reads a half-written file.
            fd, tmp = tempfile.mkstemp(dir=self.data_dir, prefix=".secret.key.")
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_hex(32))
                with contextlib.suppress(FileExistsError):
                    os.link(tmp, path)
            finally:
                os.unlink(tmp)
        return path.read_text().strip().encode()
