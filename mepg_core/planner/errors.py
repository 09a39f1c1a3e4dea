"""The planner backends' errors, shared by :mod:`.backends` and :mod:`.http_client` (re-exported by both)."""

from __future__ import annotations


class BackendError(RuntimeError):
    """A backend could not answer (a missing model, a broken endpoint ...). The message says what to fix."""


class ModelNotFoundError(BackendError, FileNotFoundError):
    """A model or adapter path that does not exist or holds no usable files."""


class AdapterMismatchError(BackendError):
    """A LoRA adapter trained for another base model than the one loaded."""


class EndpointError(BackendError):
    """An OpenAI-compatible endpoint failed. ``url`` is the request URL as shown (never with a secret);
    ``status`` the HTTP status if any."""

    def __init__(self, message: str, *, url: str = "", status: int | None = None):
        super().__init__(message)
        self.url = url
        self.status = status


class EndpointUnreachableError(EndpointError):
    """Nothing answered at the URL (connection refused, unknown host ...)."""


class EndpointTimeoutError(EndpointError):
    """The endpoint did not answer before the call's deadline."""


class EndpointHTTPError(EndpointError):
    """The endpoint answered with an HTTP error status."""


class EndpointBadResponseError(EndpointError):
    """The endpoint answered, but not with a usable HTTP reply or a chat completion in JSON."""


class EndpointResponseTooLargeError(EndpointBadResponseError):
    """The endpoint's answer is larger than the limit the caller set."""


class CallInterrupted(Exception):  # noqa: N818 - reads as what happened, like KeyboardInterrupt
    """The host cancelled the call (ComfyUI's interrupt). Not a :class:`BackendError`: the planner never
    falls back on it, it stops."""
