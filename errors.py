"""The error types every stagemesh component raises; each names the gRPC status it becomes at the edge.

Domain code (models, schedulers, rosters) raises these and never imports grpc; `proto.status` maps them
to `grpc.StatusCode` in one place.
"""


class StagemeshError(Exception):
    """Base class; `code` is the name of the grpc.StatusCode this error is reported with."""

    code = "INTERNAL"


class InvalidArgument(StagemeshError):
    code = "INVALID_ARGUMENT"


class ResourceExhausted(StagemeshError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(StagemeshError):
    code = "UNAVAILABLE"


class FailedPrecondition(StagemeshError):
    code = "FAILED_PRECONDITION"


class NotFound(StagemeshError):
    code = "NOT_FOUND"


class DeadlineExceeded(StagemeshError):
    code = "DEADLINE_EXCEEDED"


class CheckpointError(FailedPrecondition):
    """A checkpoint directory that cannot be served: missing files, tensors, wrong shapes, pickle weights."""


class PlanError(InvalidArgument):
    """A parallel layout that cannot work for the model (a degree that does not divide, too many stages)."""


class Unauthenticated(StagemeshError):
    """A missing or wrong bearer token (the gRPC interceptor and the HTTP API refuse the call before it runs)."""

    code = "UNAUTHENTICATED"
