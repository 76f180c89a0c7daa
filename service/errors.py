"""The one error type of the service: whatever refuses a request or an image carries what the client sees."""

from __future__ import annotations


class ServiceError(Exception):
    """HTTP status, machine-readable ``code`` (also the ``tome_rejections_total`` reason) and a message.

    ``valid`` lists accepted values when the error is about a name; ``headers`` go on the response
    (``Retry-After`` on 503s). Raised anywhere on the request path; rendered and counted in one place
    (``service.api.errors``). For one image of several it becomes that image's entry in ``results``.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        valid: list[str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.valid = valid
        self.headers = headers or {}


RETRY_AFTER_S = "1"


def unavailable(code: str, message: str) -> ServiceError:
    """A 503 the client should retry (queue full, warming up, draining, engine down)."""
    return ServiceError(503, code, message, headers={"Retry-After": RETRY_AFTER_S})
