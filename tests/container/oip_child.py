"""Open Inference Protocol calls with tritonclient, run in a spawned child process
(helpers/triton.py says why tritonclient cannot share the test process). Imports
neither tritonclient nor modelhost at the top."""

from __future__ import annotations

from typing import Any

import numpy as np


def infer(url: str, model: str, x: np.ndarray[Any, Any], token: str) -> dict[str, Any]:
    """ModelInfer of `x` as the input "input", with a bearer token; the first output and
    the server's readiness answers, as plain values."""
    from tritonclient.grpc import InferenceServerClient, InferInput

    headers = {"authorization": f"Bearer {token}"}
    client = InferenceServerClient(url)
    try:
        tensor = InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer(model, [tensor], headers=headers)
        (output,) = result.get_response().outputs
        return {
            "live": client.is_server_live(headers=headers),
            "ready": client.is_model_ready(model, headers=headers),
            "output": result.as_numpy(output.name),
        }
    finally:
        client.close()
