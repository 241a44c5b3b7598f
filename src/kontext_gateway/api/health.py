"""Liveness and readiness, for load balancers and orchestrators (no key needed, any Host answered).

`/health`: the process is up and its event loop answers (restart it when this fails).
`/health/ready`: it can do its work (send it traffic only while this is 200): the database answers
and its schema is this code's, the blob store takes writes, and, where this process runs jobs, its
workers are taking them (a draining process is not ready). A 503 names each check that failed.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from .deps import gateway

router = APIRouter(include_in_schema=False)

CHECK_TIMEOUT_S = 5.0  # a check that takes longer is a failed one: the probe must answer in time


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/health/ready")
async def ready(request: Request) -> JSONResponse:
    checks = await gateway(request).readiness(timeout_s=CHECK_TIMEOUT_S)
    failed = {name: problem for name, problem in checks.items() if problem != "ok"}
    if not failed:
        return JSONResponse({"status": "ready", "checks": checks})
    message = "not ready: " + "; ".join(f"{name}: {problem}" for name, problem in failed.items())
    error = {"message": message, "type": "server_error", "param": None, "code": "not_ready"}
    return JSONResponse({"status": "not_ready", "checks": checks, "error": error}, status_code=503)
