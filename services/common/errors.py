"""Domain errors. Domain code raises these; one gRPC interceptor maps them to status codes and the
gateway maps those to HTTP statuses. They know nothing of gRPC themselves."""

from __future__ import annotations


class DocloraError(Exception):
    """Base of every domain error; `code` names the gRPC status it maps to."""

    code = "INTERNAL"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(DocloraError):
    code = "INVALID_ARGUMENT"


class NotFound(DocloraError):
    code = "NOT_FOUND"


class AlreadyExists(DocloraError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(DocloraError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(DocloraError):
    code = "RESOURCE_EXHAUSTED"


class TooManyRequests(ResourceExhausted):
    """Over a rate or a count limit: try again after `retry_after_s` seconds (HTTP 429 with
    Retry-After; gRPC RESOURCE_EXHAUSTED with trailing metadata `retry-after`)."""

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = max(1, int(retry_after_s))


class Unauthenticated(DocloraError):
    code = "UNAUTHENTICATED"


class PermissionDenied(DocloraError):
    code = "PERMISSION_DENIED"


class Unavailable(DocloraError):
    code = "UNAVAILABLE"


class OutageTooLong(DocloraError):
    """A dependency (the object store, NATS, a linked server) stayed unavailable for longer than the
    outage window (`outage_window_s`): the work fails rather than waiting on. Not an `Unavailable`,
    so nothing retries it again."""

    code = "UNAVAILABLE"


class Conflict(DocloraError):
    """A compare-and-swap lost the race; the caller re-reads and retries."""

    code = "ABORTED"
