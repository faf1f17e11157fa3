"""The error types every stagemesh component raises; each names the gRPC status it becomes at the edge.

Domain code (models, schedulers, rosters) raises these and never imports grpc. `proto/rpc.py` crosses the
boundary in one place each way: `maps_errors` turns a raised error into its gRPC status, `error_from_rpc`
turns a failed call's status back into the class below that names it (`error_for_code`).
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


class Unauthenticated(StagemeshError):
    code = "UNAUTHENTICATED"


class PermissionDenied(StagemeshError):
    code = "PERMISSION_DENIED"


class Cancelled(StagemeshError):
    code = "CANCELLED"


class Unimplemented(StagemeshError):
    code = "UNIMPLEMENTED"


class CheckpointError(FailedPrecondition):
    """A checkpoint directory that cannot be served: missing files, tensors, wrong shapes, pickle weights."""


class PlanError(InvalidArgument):
    """A parallel layout that cannot work for the model (a degree that does not divide, too many stages)."""


_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        ResourceExhausted,
        Unavailable,
        FailedPrecondition,
        NotFound,
        DeadlineExceeded,
        Unauthenticated,
        PermissionDenied,
        Cancelled,
        Unimplemented,
    )
}


def error_for_code(code: str, message: str) -> StagemeshError:
    """The error a status code name (e.g. "INVALID_ARGUMENT") stands for; codes without a class of their own
    (INTERNAL, UNKNOWN, DATA_LOSS, ...) are a StagemeshError, reported as INTERNAL, with the code in the text."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return StagemeshError(message if code == "INTERNAL" else f"{message} ({code})")
    return cls(message)
