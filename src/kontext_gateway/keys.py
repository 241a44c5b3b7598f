"""API keys: created at random, shown once, stored as SHA-256; who may call the gateway, and how much.

A key carries its limits (allowed models, budget in USD per day / week / month or for its lifetime,
requests and images per minute, requests at once). The CLI (`kontext keys ...`) and the admin API
both go through `KeyStore`, on the same database the server reads on every request, so a key
created or revoked from the command line takes effect at once.

Who must show a key (see `Authenticator`): nobody while the gateway is on loopback and has never
had a key; everybody once a key exists, an admin key is configured, or it listens beyond loopback.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .errors import GatewayError, invalid, not_found
from .pricing import micros, usd
from .store.ledger import PERIODS, period_start
from .store.models import utcnow
from .store.records import KeyRow
from .timing import iso

if TYPE_CHECKING:
    from .catalog import Catalog
    from .config import Settings
    from .store.keys import KeyRows

PREFIX = "kx-"
MAX_BUDGET_USD = 1_000_000_000  # in micros it still fits a 64-bit column a million times over
MAX_LIMIT = 2**31 - 1  # rpm, ipm, max_concurrent: 32-bit integer columns
MAX_NAME_CHARS = 128


def new_key() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def hint(key: str) -> str:
    return f"{key[:7]}...{key[-4:]}"


class Owned(Protocol):
    """A stored thing that belongs to an API key (None: made on the open gateway)."""

    @property
    def key_id(self) -> str | None: ...


@dataclass(frozen=True)
class Principal:
    """Who is calling. `key_id` None: the open gateway (loopback, no keys), which may do anything."""

    key_id: str | None = None
    name: str | None = None
    admin: bool = False
    models: tuple[str, ...] | None = None
    budget_period: str | None = None
    rpm: int | None = None
    ipm: int | None = None
    max_concurrent: int | None = None
    stored: bool = False  # a key row in the database (not the environment's admin key, not OPEN)

    @property
    def scope(self) -> str:
        """What an idempotency key or a listing is scoped to."""
        return self.key_id or ""

    def sees_all(self) -> bool:
        return self.admin or self.key_id is None

    def owns(self, record: Owned | None) -> bool:
        """Whether a stored thing (request, file) is this caller's to see: to other keys it does not exist."""
        return record is not None and (self.sees_all() or record.key_id == self.key_id)


OPEN = Principal(admin=True)


def view(r: KeyRow) -> dict[str, Any]:
    """A key as the API and the CLI show it: never the key itself, nor its hash."""
    now = utcnow()
    current = r.period_start is not None and r.period_start == period_start(r.budget_period, now)
    spent = r.spent_micros if current else 0
    remaining = None if r.budget_micros is None else r.budget_micros - spent - r.reserved_micros
    return {
        "object": "api_key",
        "id": r.id,
        "name": r.name,
        "hint": r.hint,
        "admin": r.admin,
        "models": r.models,
        "budget_usd": usd(r.budget_micros),
        "budget_period": r.budget_period,
        "rpm": r.rpm,
        "ipm": r.ipm,
        "max_concurrent": r.max_concurrent,
        "spent_usd": usd(spent),
        "reserved_usd": usd(r.reserved_micros),
        "remaining_usd": usd(remaining),
        "total_spent_usd": usd(r.total_spent_micros),
        "created_at": iso(r.created_at),
        "last_used_at": iso(r.last_used_at),
        "revoked_at": iso(r.revoked_at),
        "status": "revoked" if r.revoked_at else "active",
    }


class KeyStore:
    """Key lifecycle: what a valid key and its limits are, on `KeyRows`. Validation errors are
    GatewayErrors (400 / 404)."""

    def __init__(self, rows: KeyRows, catalog: Catalog) -> None:
        self.rows = rows
        self.catalog = catalog

    async def create(
        self, *, name: str, admin: bool = False, limits: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], str]:
        """Returns (the key's view, the key itself: shown this once). `limits`: the settings below
        (`_limits`), as a client sent them."""
        if not name or len(name) > MAX_NAME_CHARS or not name.isprintable():
            raise invalid(
                f"'name' must be 1 to {MAX_NAME_CHARS} printable characters.", param="name", code="invalid_value"
            )
        key = new_key()
        row = await self.rows.insert(
            id="key_" + uuid.uuid4().hex[:16],
            name=name,
            hash=hash_key(key),
            hint=hint(key),
            admin=admin,
            limits=self._limits(limits or {}),
        )
        return view(row), key

    async def update(self, key_id: str, limits: dict[str, Any]) -> dict[str, Any]:
        """Change limits (None clears one); the spend so far stays."""
        return view(_found(await self.rows.update(key_id, self._limits(limits, partial=True)), key_id))

    async def revoke(self, key_id: str) -> dict[str, Any]:
        return view(_found(await self.rows.revoke(key_id, utcnow()), key_id))

    async def get(self, key_id: str) -> dict[str, Any]:
        return view(_found(await self.rows.get(key_id), key_id))

    async def list(self, *, include_revoked: bool = True) -> list[dict[str, Any]]:
        return [view(r) for r in await self.rows.list(include_revoked=include_revoked)]

    async def find(self, key: str) -> KeyRow | None:
        return await self.rows.by_hash(hash_key(key))

    async def any(self) -> bool:
        return await self.rows.any()

    def _limits(self, given: dict[str, Any], *, partial: bool = False) -> dict[str, Any]:
        known = {"models", "budget_usd", "budget_period", "rpm", "ipm", "max_concurrent"}
        if unknown := set(given) - known:
            name = sorted(unknown)[0]
            raise invalid(
                f"Unknown key setting '{name}'; known: {', '.join(sorted(known))}.",
                param=name,
                code="unknown_parameter",
            )
        out: dict[str, Any] = {}
        if "models" in given:
            models = given["models"]
            if models is not None:
                if isinstance(models, str):
                    models = [m for m in models.split(",") if m.strip()]
                if not isinstance(models, list) or not models:
                    raise invalid(
                        "'models' must be a non-empty list of model ids (or null for all).",
                        param="models",
                        code="invalid_value",
                    )
                models = sorted({self.catalog.resolve(str(m).strip())[0].id for m in models})  # 404 if unknown
            out["models"] = models
        if "budget_usd" in given:
            budget = given["budget_usd"]
            if budget is not None and (
                not isinstance(budget, (int, float)) or isinstance(budget, bool) or not 0 <= budget <= MAX_BUDGET_USD
            ):  # also refuses NaN
                raise invalid(
                    f"'budget_usd' must be a number of US dollars from 0 to {MAX_BUDGET_USD:,}.",
                    param="budget_usd",
                    code="invalid_value",
                )
            out["budget_micros"] = None if budget is None else micros(float(budget))
        if "budget_period" in given:
            period = given["budget_period"]
            if period is not None and period not in PERIODS:
                raise invalid(
                    f"'budget_period' must be one of {', '.join(PERIODS)} (or null: the key's lifetime).",
                    param="budget_period",
                    code="invalid_value",
                )
            out["budget_period"] = period
        for name in ("rpm", "ipm", "max_concurrent"):
            if name in given:
                value = given[name]
                if value is not None and (
                    not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_LIMIT
                ):
                    raise invalid(
                        f"'{name}' must be a whole number from 1 to {MAX_LIMIT} (or null: no limit).",
                        param=name,
                        code="invalid_value",
                    )
                out[name] = value
        if not partial:
            for name in ("models", "budget_micros", "budget_period", "rpm", "ipm", "max_concurrent"):
                out.setdefault(name, None)
        return out


class Authenticator:
    """Turns an `Authorization` header into a Principal, or a 401 in the OpenAI envelope.

    A database read per request would cost more than the rest of a cheap request (about 1.4 ms
    through the ORM and aiosqlite against 0.1 ms for GET /v1/models), so what is read is kept for
    `CACHE_S`: a key found is trusted that long (a revocation elsewhere, e.g. from the CLI, takes
    effect within it; here at once), and "no key exists yet" is re-checked that often. A key never
    seen before is always looked up, so a new key works at once."""

    CACHE_S = 1.0

    def __init__(self, settings: Settings, keys: KeyStore, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.keys = keys
        self.clock = clock
        admin = settings.admin_key.get_secret_value() if settings.admin_key else None
        self._admin_hash = hash_key(admin) if admin else None
        self._keyed = self._admin_hash is not None or not settings.binds_loopback()
        self._keyed_checked = -float("inf")
        self._found: dict[str, tuple[float, Principal | None]] = {}  # key hash -> (when read, who; None: revoked)

    async def required(self) -> bool:
        # Keys are revoked, never deleted: once one exists the gateway stays keyed.
        if not self._keyed and self.clock() - self._keyed_checked >= self.CACHE_S:
            self._keyed_checked = self.clock()  # first: concurrent requests do not all ask at once
            self._keyed = await self.keys.any()
        return self._keyed

    def forget(self, key_id: str | None = None) -> None:
        """Drop cached keys (all, or one): called when this process changes or revokes a key."""
        if key_id is None:
            self._found.clear()
        else:
            self._found = {h: v for h, v in self._found.items() if v[1] is None or v[1].key_id != key_id}
        self._keyed_checked = -float("inf")

    async def authenticate(self, authorization: str | None) -> Principal:
        token = _bearer(authorization)
        if token is None:
            if not await self.required():
                return OPEN
            raise unauthorized(
                "Missing API key. Send it as 'Authorization: Bearer <key>' (create one with `kontext keys create`)."
            )
        digest = hash_key(token)
        if self._admin_hash is not None and hmac.compare_digest(digest, self._admin_hash):
            return Principal(key_id="admin", name="admin key (KONTEXT_ADMIN_KEY)", admin=True)
        cached = self._found.get(digest)
        if cached is not None and self.clock() - cached[0] < self.CACHE_S:
            who = cached[1]
        else:
            row = await self.keys.find(token)
            if row is None:
                if not await self.required():
                    return OPEN  # an open gateway ignores a stray key, as it would a missing one
                raise unauthorized(f"Incorrect API key provided: {hint(token) if len(token) > 12 else '***'}.")
            self._keyed = True  # a key exists: from now on every caller needs one
            who = (
                None
                if row.revoked_at is not None
                else Principal(
                    key_id=row.id,
                    name=f"{row.name}",
                    admin=row.admin,
                    stored=True,
                    models=tuple(row.models) if row.models is not None else None,
                    budget_period=row.budget_period,
                    rpm=row.rpm,
                    ipm=row.ipm,
                    max_concurrent=row.max_concurrent,
                )
            )
            if len(self._found) > 10_000:  # bounded: only real keys are kept, but be safe
                self._found.clear()
            self._found[digest] = (self.clock(), who)
        if who is None:
            raise unauthorized("This API key has been revoked.")
        return who


def unauthorized(message: str) -> GatewayError:
    return GatewayError(message, status=401, code="invalid_api_key", headers={"www-authenticate": "Bearer"})


def forbidden(message: str, *, param: str | None = None, code: str = "permission_denied") -> GatewayError:
    return GatewayError(message, status=403, type="permission_error", param=param, code=code)


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _found(row: KeyRow | None, key_id: str) -> KeyRow:
    if row is None:
        raise _no_key(key_id)
    return row


def _no_key(key_id: str) -> GatewayError:
    return not_found(f"No API key '{key_id}'.", param="key_id", code="key_not_found")
