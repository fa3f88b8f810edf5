"""The modelhost client library: `ModelHostClient` (blocking) and `AsyncModelHostClient`.

    from modelhost.client import ModelHostClient

    with ModelHostClient("127.0.0.1:50051") as client:
        client.save_checkpoint("resnet18-v1", model.state_dict())
        client.load_model("resnet18", architecture="resnet18", checkpoint="resnet18-v1")
        logits = client.predict("resnet18", images)  # numpy in, numpy out

Importing it never imports torch; torch is needed only to send torch tensors or
state_dicts, or to load a downloaded checkpoint in memory.
"""

from modelhost.client.aio import AsyncModelHostClient
from modelhost.client.archives import UnsafeArchive
from modelhost.client.channel import ChannelConfig
from modelhost.client.errors import (
    AlreadyExistsError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    ModelHostError,
    NotFoundError,
    PermissionDeniedError,
    ProtocolError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from modelhost.client.sync import ModelHostClient
from modelhost.client.types import (
    Architecture,
    Batching,
    CheckpointInfo,
    ModelInfo,
    TensorSpec,
    TopClass,
)

__all__ = [
    "AlreadyExistsError",
    "Architecture",
    "AsyncModelHostClient",
    "Batching",
    "ChannelConfig",
    "CheckpointInfo",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "ModelHostClient",
    "ModelHostError",
    "ModelInfo",
    "NotFoundError",
    "PermissionDeniedError",
    "ProtocolError",
    "ResourceExhaustedError",
    "TensorSpec",
    "TopClass",
    "UnauthenticatedError",
    "UnavailableError",
    "UnsafeArchive",
]
