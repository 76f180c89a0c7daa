"""The one exception type for input the service refuses before it reaches a queue."""

from __future__ import annotations


class Rejection(Exception):
    """Carries the HTTP status, the ``tome_rejections_total`` reason and a message for the client."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
