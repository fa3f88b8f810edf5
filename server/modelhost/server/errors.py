"""Domain errors raised below the servicer; `rpc.STATUS` maps each to a gRPC status."""

from __future__ import annotations


class ModelHostFailure(Exception):
    """Base of every error the server reports to callers with its message."""


class InvalidArgument(ModelHostFailure):
    """A malformed request field."""


class InvalidName(InvalidArgument):
    """A checkpoint or model name that is not a valid name."""


class InvalidInput(InvalidArgument):
    """Predict inputs the model cannot take (dtype, rank, shape, byte length)."""


class InvalidCheckpoint(InvalidArgument):
    """A file that is not a loadable checkpoint, or one that does not fit the model."""


class UnknownArchitecture(InvalidArgument):
    """An architecture name nobody registered."""


class NotFound(ModelHostFailure):
    """Base for unknown names."""


class ModelNotFound(NotFound):
    """No hosted model (or version) by that name."""


class CheckpointNotFound(NotFound):
    """No stored checkpoint by that name."""


class AlreadyExists(ModelHostFailure):
    """A checkpoint name or model version that is taken."""


class OutOfMemory(ModelHostFailure):
    """The device (or host) ran out of memory; what was allocated has been released."""


class LimitExceeded(ModelHostFailure):
    """A configured limit (size, queue, count) was reached."""


class StoreFull(LimitExceeded):
    """The checkpoint store's volume is full (or its quota spent); nothing was changed."""


class Refused(ModelHostFailure):
    """The server's configuration refuses the request (e.g. pickled models)."""


class DataLoss(ModelHostFailure):
    """Bytes that should be there are not, or are not what they should be."""


class ChecksumMismatch(DataLoss):
    """Bytes did not hash to the checksum the caller announced."""


class MissingBytes(DataLoss):
    """A checkpoint's manifest entry is there, its bytes are not (removed behind the store)."""


class DeadlineExpired(ModelHostFailure):
    """The caller's deadline passed before the work ran."""


class ShuttingDown(ModelHostFailure):
    """The server is draining and takes no new work."""


class VersionUnloaded(ShuttingDown):
    """A request's version was unloaded before it could serve it (it waited for a
    page-in): a request for the newest version goes to the newest one left."""


class StoreBusy(ModelHostFailure):
    """Another server sharing the store held its lock for longer than a commit takes."""


class DeviceFailed(ModelHostFailure):
    """The device failed (its context is lost): not the caller's fault. The server
    reports NOT_SERVING so that it is restarted."""
