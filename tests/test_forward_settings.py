"""Several inputs reach a model that declares none as keyword arguments of its forward:
only parameters that take an input (no default, or None) may be filled by a caller, never
a setting with a default (red team 10, H2: RAFT's `num_flow_updates=12`, sent as a tensor
of one number, held the CPU lane for 9 s and took a gigabyte)."""

from __future__ import annotations

import grpc
import numpy as np
import torch

from conftest import expect, serve
from modelhost.client import ModelHostClient

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def test_inputs_fill_parameters_and_never_settings(client: ModelHostClient) -> None:
    """Required and optional (None, a tensor) parameters answer as in-process; a setting
    (one row, as the inputs have; by its default or by its annotation) and a name forward
    does not take are refused before they run; the model serves on."""
    model = serve(client, "blend", architecture="blend")
    rng = np.random.default_rng(0)
    image, other, mask = (rng.standard_normal((1, 3)).astype(np.float32) for _ in range(3))

    def expected(**inputs: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()

    served = client.predict("blend", {"image": image, "other": other})["output"]
    np.testing.assert_allclose(served, expected(image=image, other=other))
    served = client.predict("blend", {"image": image, "other": other, "mask": mask})["output"]
    np.testing.assert_allclose(served, expected(image=image, other=other, mask=mask))
    times = np.array([7], dtype=np.int64)  # a 10**9 held the lane for as long
    expect(
        INVALID,
        lambda: client.predict("blend", {"image": image, "other": other, "times": times}),
        "input 'times' would set a setting of the model's forward (its default is 3)",
    )
    expect(  # defaults to None, but annotated as a number: a setting too
        INVALID,
        lambda: client.predict("blend", {"image": image, "other": other, "limit": times}),
        "input 'limit' would set a setting of the model's forward (it is annotated 'int | None'",
    )
    expect(
        INVALID,
        lambda: client.predict("blend", {"image": image, "other": other, "extra": mask}),
        "input 'extra' is not a parameter of the model's forward",
    )
    served = client.predict("blend", {"image": image, "other": other})["output"]
    np.testing.assert_allclose(served, expected(image=image, other=other))
