"""Domain errors, each with the gRPC status code it maps to.

Code anywhere raises these; `cbir.grpc_server.ErrorInterceptor` turns them into statuses in one
place. Messages are for people: say what was wrong and, where possible, what to do.
"""

import grpc


class CbirError(Exception):
    code = grpc.StatusCode.INTERNAL


class InvalidRequest(CbirError):
    """The request itself is wrong: empty, bad k, wrong vector dimension."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class BadImage(InvalidRequest):
    """The bytes are not an image we can use (corrupt, unknown format, too large)."""


class NotFound(CbirError):
    code = grpc.StatusCode.NOT_FOUND


class NotReady(CbirError):
    """The service is up but cannot answer yet (model loading, no index bundle)."""

    code = grpc.StatusCode.UNAVAILABLE


class Incompatible(CbirError):
    """Vectors from one model sent to an index built with another, or a bundle that does not fit."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class BundleError(CbirError):
    """An index bundle is missing, incomplete or corrupt."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class UpstreamUnavailable(CbirError):
    code = grpc.StatusCode.UNAVAILABLE


class UpstreamTimeout(CbirError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Overloaded(CbirError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class WeightsError(CbirError):
    """No usable VGG-16 weights: raised at start, with what was tried and how to fix it."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class SetupError(CbirError):
    """A service cannot be set up as configured (e.g. no usable calibration photos): raised at start, in words."""

    code = grpc.StatusCode.FAILED_PRECONDITION
