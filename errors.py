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


class CollectiveError(Unavailable):
    """A collective of a stage's tensor-parallel group failed (a peer is gone, timed out, or out of step):
    the group cannot compute any more. Only this error means that; a failed step does not."""


class CheckpointError(FailedPrecondition):
    """A checkpoint directory that cannot be served: missing files, tensors, wrong shapes, pickle weights."""


class PlanError(InvalidArgument):
    """A parallel layout that cannot work for the model (a degree that does not divide, too many stages)."""


def error_for_code(code: str, message: str) -> StagemeshError:
    """The error type that reports as `code` (a grpc.StatusCode name), carrying `message`."""
    for kind in (InvalidArgument, ResourceExhausted, Unavailable, FailedPrecondition, NotFound, DeadlineExceeded):
        if kind.code == code:
            return kind(message)
    return StagemeshError(message)
