"""The one vocabulary of upstream failures: every way a hosted provider can fail, classified once.

`kind` is what an attempt shows as its error class. Two questions decide what happens next:
`retryable` (worth another try on the same provider: a submit that may not have made a task, or a
task lost to something transient) and `failover` (worth trying another provider). Moderation is
neither: the same content would be refused anywhere.
"""

from __future__ import annotations

from typing import ClassVar


class UpstreamError(Exception):
    kind: ClassVar[str] = "upstream_error"
    retryable: ClassVar[bool] = True
    failover: ClassVar[bool] = True

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after = retry_after
        self.billed_images: int | None = None  # images the upstream billed although this failed
        self.submitted = False  # set once a task exists upstream: resubmitting would pay again
        self.images_asked = 0  # the images the failed task was to make (what a billed failure costs)


class Moderated(UpstreamError):
    """The prompt, an input or the output was flagged. Never retried, never failed over."""

    kind = "content_policy_violation"
    retryable = False
    failover = False


class Misconfigured(UpstreamError):
    """401/403: this provider's credentials are wrong. Fail over and report."""

    kind = "authentication"
    retryable = False


class PaymentRequired(UpstreamError):
    kind = "payment_required"
    retryable = False


class Rejected(UpstreamError):
    """The upstream refused the request itself (400/404/422): another provider may take it."""

    kind = "invalid_request"
    retryable = False


class RateLimited(UpstreamError):
    kind = "rate_limited"


class ServerError(UpstreamError):
    kind = "server_error"


class Timeout(UpstreamError):
    kind = "timeout"


class ConnectionFailed(UpstreamError):
    kind = "connection_error"


class Malformed(UpstreamError):
    kind = "malformed_response"


class UntrustedURL(Malformed):
    """A URL from the provider (one its response returned, or a redirect) leads off its own hosts, so
    its key was not sent there. Not the caller's fault, and the provider would answer alike again: no
    retry on it, fail over."""

    retryable = False


class TaskFailed(UpstreamError):
    """The upstream ran the task and reports that it failed (BFL `Error`, Replicate `failed`). Likely
    to fail again the same way: not resubmitted (that would be paid again), failed over."""

    kind = "task_failed"
    retryable = False


class TaskLost(UpstreamError):
    """The upstream no longer knows the task (BFL `Task not found`): resubmitted once."""

    kind = "task_lost"


class BadResult(UpstreamError):
    """The result URL did not answer with a decodable image."""

    kind = "bad_result"
