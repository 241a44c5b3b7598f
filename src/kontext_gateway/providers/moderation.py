"""Every moderation signal the hosted providers document, in one table.

A matching answer ends the request with 400 `content_policy_violation`: never resubmitted, never
failed over (the same content would be refused anywhere). Where each signal is found:

- `status`: the task's status (BFL and Fireworks poll answers);
- `error`: the text of a failed task's error (Replicate: moderation has no status of its own, only a
  `failed` prediction whose `error` says so);
- `error_type`: the `type` of an entry of an error answer's `detail` (fal answers 422);
- `flag`: a result field whose truthy entries mean an output was flagged (fal [dev]).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Where = Literal["status", "error", "error_type", "flag"]


@dataclass(frozen=True)
class Signal:
    provider: str
    where: Where
    pattern: str  # the exact value, or for `error` a regular expression (case-insensitive)
    means: str

    def matches(self, value: str) -> bool:
        if self.where == "error":
            return re.search(self.pattern, value, re.IGNORECASE) is not None
        return value == self.pattern


SIGNALS: tuple[Signal, ...] = (
    Signal("replicate", "error", r"\(E005\)", "input or output flagged as sensitive (error code E005)"),
    Signal("replicate", "error", r"flagged as (potentially )?sensitive", "flagged by the safety system"),
    Signal("replicate", "error", r"contained NSFW content", "[dev]'s safety checker flagged the output"),
    Signal("fal", "error_type", "content_policy_violation", "the content checker flagged the request (422)"),
    Signal("fal", "flag", "has_nsfw_concepts", "[dev]'s safety checker flagged an output"),
    Signal("bfl", "status", "Request Moderated", "the prompt or an input was flagged"),
    Signal("bfl", "status", "Content Moderated", "the output was flagged"),
    Signal("fireworks", "status", "Request Moderated", "the prompt or an input was flagged"),
    Signal("fireworks", "status", "Content Moderated", "the output was flagged"),
)


def flagged(provider: str, where: Where, value: object) -> Signal | None:
    """The signal `value` (found at `where` in one of `provider`'s answers) is, or None."""
    if not isinstance(value, str):
        return None
    return next((s for s in SIGNALS if s.provider == provider and s.where == where and s.matches(value)), None)


def flags(provider: str) -> tuple[str, ...]:
    """The result fields that flag outputs, for `provider`."""
    return tuple(s.pattern for s in SIGNALS if s.provider == provider and s.where == "flag")
