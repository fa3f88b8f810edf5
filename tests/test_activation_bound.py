"""A Predict's activations are bounded by the model's own cost, measured at load (red team
round 8, M1): `--max-tensor-elements` bounds what a caller sends, but a segmentation model
took about 45 times its input's bytes, so a request at the defaults' largest could take
about 12 GB. The load measures what one row takes (`activations.py`); a request or batch
estimated over `max_predict_bytes` is refused, and batches stop short of it.
"""

from __future__ import annotations

import dataclasses
import io
import threading
from collections.abc import Iterator
from functools import partial

import grpc
import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from conftest import expect, images, reference, resnet18, serve
from helpers.models import Attention, fixed_size
from modelhost.client import ModelHostClient
from modelhost.server import Server, Settings, running
from modelhost.server.activations import ActivationCost, LiveTensors
from modelhost.server.architectures import ArchitectureCatalog
from modelhost.server.inference import InputSpec, Runner
from modelhost.server.loading import LoadSpec, probe_skeleton

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
MiB = 1 << 20


def one_row_peak(model: nn.Module, x: torch.Tensor) -> int:
    """The most bytes the in-process model's tensors held at once for `x`."""
    with torch.inference_mode(), LiveTensors() as live:
        model(x)
    return live.peak


def test_live_tensors_counts_what_is_alive_at_once() -> None:
    """Storages made by operations count once, from their making to their freeing; views
    and in-place results add nothing; what existed before does not count."""
    before = torch.ones(MiB // 4)
    with LiveTensors() as live:
        a = torch.ones(MiB // 4)  # 1 MiB
        b = a * 2  # 2 MiB alive
        del a  # 1 MiB
        c = b + before  # 2 MiB
        c.view(-1).add_(1)
        del b, c  # nothing
        d = torch.ones(MiB // 8)  # 0.5 MiB
    assert live.peak == 2 * MiB
    assert live.now == d.nbytes


def test_the_cost_follows_linear_and_quadratic_growth() -> None:
    """Fitted through one-row runs at two sizes, the cost predicts larger inputs: a
    convolutional network's linearly, attention's with its sequence's square (a linear
    fit would underestimate 4096 tokens about 15 times)."""
    torch.manual_seed(0)
    conv = resnet18()
    runner = Runner(conv, torch.device("cpu"), torch.float32)
    runs = [
        (3 * side * side, runner.peak_bytes({"x": torch.zeros(1, 3, side, side)}))
        for side in (224, 112)
    ]
    cost = ActivationCost.measured(runs)
    assert cost is not None and cost.quadratic == 0
    big = one_row_peak(conv, torch.zeros(2, 3, 448, 448))
    assert cost.estimate([(2, 3, 448, 448)]) == pytest.approx(big, rel=0.02)

    attention = Attention().eval()
    runner = Runner(attention, torch.device("cpu"), torch.float32)
    runs = [
        (length, runner.peak_bytes({"x": torch.zeros(1, length, dtype=torch.long)}))
        for length in (224, 112)
    ]
    cost = ActivationCost.measured(runs)
    assert cost is not None and cost.quadratic > 0
    long = one_row_peak(attention, torch.zeros(1, 4096, dtype=torch.long))
    assert cost.estimate([(1, 4096)]) == pytest.approx(long, rel=0.02)
    assert runs[0][1] / 224 * 4096 < long / 10


@pytest.mark.parametrize(
    ("architecture", "args", "dtype"),
    [
        ("resnet18", {"num_classes": 10}, torch.float32),
        ("resnet18", {"num_classes": 10}, torch.bfloat16),
        ("fcn_resnet50", {"num_classes": 5, "weights_backbone": None}, torch.float32),
        ("vit_b_16", {"num_classes": 10}, torch.float32),
    ],
)
def test_the_skeleton_on_the_meta_device_costs_what_the_model_does(
    architecture: str, args: dict[str, object], dtype: torch.dtype
) -> None:
    """The load measures a catalog architecture on the meta device (no memory, no
    compute): its estimate is what the real model's tensors hold, at a size it was not
    measured at. ViT takes 224 x 224 only: it is measured at that size alone."""
    spec = LoadSpec("m", architecture, dict(args), "w", torch.device("cpu"), None)
    image = [InputSpec("input", torch.float32, (-1, 3, -1, -1))]
    cost = probe_skeleton(ArchitectureCatalog([]), spec, image, dtype).activations
    assert cost is not None
    side = 224 if architecture.startswith("vit") else 160
    model = torchvision.models.get_model(architecture, weights=None, **args).eval().to(dtype)
    real = one_row_peak(model, torch.zeros(2, 3, side, side, dtype=dtype))
    assert cost.estimate([(2, 3, side, side)]) == pytest.approx(real, rel=0.02)


def test_the_remembered_cost_does_not_depend_on_which_dtype_probed_first() -> None:
    """The skeleton's cost is remembered per architecture in float32 and scaled to each
    version's dtype. A float16 version probed first (its inputs float16) once left a
    float16 cost behind: float32 versions of the same architecture were then estimated at
    half what they take, and `max_predict_bytes` was twice too loose."""
    catalog = ArchitectureCatalog([])
    args = {"num_classes": 7}  # an argument no other test probes with: a fresh entry
    spec = LoadSpec("m", "resnet18", args, "w", torch.device("cpu"), None)
    half = [InputSpec("input", torch.float16, (-1, 3, -1, -1))]
    full = [InputSpec("input", torch.float32, (-1, 3, -1, -1))]
    halved = probe_skeleton(catalog, spec, half, torch.float16).activations
    after = probe_skeleton(catalog, spec, full, torch.float32).activations
    assert halved is not None and after is not None
    model = torchvision.models.get_model("resnet18", weights=None, **args).eval()
    real = one_row_peak(model, torch.zeros(2, 3, 160, 160))
    assert after.estimate([(2, 3, 160, 160)]) == pytest.approx(real, rel=0.02)
    assert halved.estimate([(2, 3, 160, 160)]) == pytest.approx(real / 2, rel=0.02)


def test_an_overhead_that_does_not_grow_is_counted_as_if_it_did() -> None:
    """Runs that show less than linear growth give the larger run's bytes per element:
    never less than a larger input takes."""
    cost = ActivationCost.measured([(100, 10_000 + 2 * 100), (400, 10_000 + 2 * 400)])
    assert cost == ActivationCost(10_800 / 400)
    for elements in (400, 1000, 10**6):
        assert cost.estimate([(1, elements)]) >= 10_000 + 2 * elements
    assert ActivationCost.measured([]) is None


@pytest.fixture
def bounded(settings: Settings) -> Iterator[tuple[Server, ModelHostClient, int]]:
    """A server whose max_predict_bytes holds 4.5 rows of resnet18 at 32 x 32 (by the
    in-process model's peak); the server, a client, and that row's bytes."""
    row = one_row_peak(resnet18(), torch.zeros(1, 3, 32, 32))
    limited = dataclasses.replace(settings, max_predict_bytes=int(4.5 * row))
    with running(limited) as server, ModelHostClient(server.target, timeout=120) as client:
        yield server, client, row


def test_a_predict_over_its_bound_is_refused_and_the_server_serves_on(
    bounded: tuple[Server, ModelHostClient, int],
) -> None:
    """Four rows answer as in-process; five are refused before they queue, with the
    estimate and the setting named; the model and others keep serving."""
    server, client, _ = bounded
    model = serve(client, "r18")
    x = images(4, size=32)
    np.testing.assert_allclose(client.predict("r18", x), reference(model, x), rtol=1e-4, atol=1e-5)
    expect(
        EXHAUSTED,
        lambda: client.predict("r18", images(5, size=32)),
        "5x3x32x32",
        "bytes per input element, measured at load",
        "max_predict_bytes",
    )
    expect(EXHAUSTED, lambda: client.predict("r18", images(1, size=80)), "max_predict_bytes")
    assert server.host is not None
    assert server.host.models.get("r18").batcher.statistics.snapshot().fail.count == 0
    np.testing.assert_allclose(client.predict("r18", x), reference(model, x), rtol=1e-4, atol=1e-5)
    other = serve(client, "other", resnet18(seed=1))
    np.testing.assert_allclose(
        client.predict("other", x), reference(other, x), rtol=1e-4, atol=1e-5
    )


def test_batches_stop_short_of_the_bound(bounded: tuple[Server, ModelHostClient, int]) -> None:
    """Eight callers of two rows each, queued together: every batch holds at most four
    rows (what the bound allows), merging still happens, and every caller gets its own
    rows right with no failed batch."""
    server, client, _ = bounded
    model = serve(client, "r18", batching={"max_batch_size": 32, "max_queue_delay_us": 300_000})
    inputs = [images(2, size=32, seed=i) for i in range(8)]
    clients = [ModelHostClient(server.target, timeout=60) for _ in inputs]
    outs: list[object] = [None] * len(inputs)

    def call(i: int) -> None:
        outs[i] = clients[i].predict("r18", inputs[i])

    try:
        threads = [threading.Thread(target=partial(call, i)) for i in range(len(inputs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for c in clients:
            c.close()
    for x, out in zip(inputs, outs, strict=True):
        assert isinstance(out, np.ndarray), out
        np.testing.assert_allclose(out, reference(model, x), rtol=1e-4, atol=1e-5)
    assert server.host is not None
    stats = server.host.models.get("r18").batcher.statistics.snapshot()
    assert max(stats.batches) <= 4, stats.batches
    assert max(stats.batches) == 4, stats.batches  # merged up to the bound, not one by one
    assert stats.fail.count == 0 and stats.inference_count == 16
    splits = server.host.metrics.registry.get_sample_value(
        "modelhost_batch_splits_total", {"model": "r18", "version": "1"}
    )
    assert splits == 0  # no batch was made only to be refused and halved


def test_a_warmup_shape_over_the_bound_is_refused_at_load(
    bounded: tuple[Server, ModelHostClient, int],
) -> None:
    """The load's warm-up is a batch like any other (as a detection model's is)."""
    _, client, _ = bounded
    client.save_checkpoint("w", resnet18().state_dict())
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: client.load_model(
            "r18",
            architecture="resnet18",
            checkpoint="w",
            architecture_args={"num_classes": 10},
            warmup_shape=(8, 3, 32, 32),
        ),
        "warmup_shape: an input of 8x3x32x32",
        "max_predict_bytes",
    )
    assert client.list_models() == []


def test_zero_means_no_bound(settings: Settings) -> None:
    unbounded = dataclasses.replace(settings, max_predict_bytes=0)
    with running(unbounded) as server, ModelHostClient(server.target, timeout=120) as client:
        model = serve(client, "r18")
        x = images(2, size=256)
        np.testing.assert_allclose(
            client.predict("r18", x), reference(model, x), rtol=1e-4, atol=1e-5
        )


def test_an_exported_transformer_is_bounded_by_its_quadratic_cost(settings: Settings) -> None:
    """An exported program with a dynamic sequence length: 2,048 tokens answer as
    in-process, 4,096 (32 KB sent, about 136 MB of scores) are refused, though a linear
    estimate would have let them through."""
    torch.manual_seed(0)
    model = Attention().eval()
    example = (torch.zeros(2, 64, dtype=torch.long),)
    dims = ({0: torch.export.Dim("batch", max=64), 1: torch.export.Dim("tokens", max=8192)},)
    buffer = io.BytesIO()
    torch.export.save(torch.export.export(model, example, dynamic_shapes=dims), buffer)
    limit = 64 * MiB
    unsafe = dataclasses.replace(settings, allow_pickled_models=True, max_predict_bytes=limit)
    with running(unsafe) as server, ModelHostClient(server.target, timeout=120) as client:
        client.save_checkpoint("attention", buffer.getvalue())
        client.load_model("attention", checkpoint="attention")
        ids = np.random.default_rng(0).integers(0, 1000, (1, 2048))
        with torch.inference_mode():
            expected = model(torch.from_numpy(ids)).numpy()
        np.testing.assert_allclose(client.predict("attention", ids), expected, rtol=1e-4)
        long = np.zeros((1, 4096), dtype=np.int64)
        linear = one_row_peak(model, torch.zeros(1, 224, dtype=torch.long)) / 224 * 4096
        assert linear < limit
        expect(EXHAUSTED, lambda: client.predict("attention", long), "1x4096", "x its row's")
        np.testing.assert_allclose(client.predict("attention", ids), expected, rtol=1e-4)


def test_a_builder_of_your_own_that_declares_its_input_is_measured_too(
    settings: Settings,
) -> None:
    """`attention.input_shape = (-1, -1)`, `input_dtype = "int64"`: its outputs are known
    at load, before any request, and its activations bound it as an exported program's
    do; a builder that declares an input without a batch dimension is refused at start."""
    limited = dataclasses.replace(settings, max_predict_bytes=64 * MiB)
    with running(limited) as server, ModelHostClient(server.target, timeout=120) as client:
        model = serve(client, "att", architecture="attention", architecture_args={"width": 64})
        info = client.get_model("att")
        assert [(i.dtype, i.shape) for i in info.inputs] == [("int64", (-1, -1))]
        assert [(o.dtype, o.shape) for o in info.outputs] == [("float32", (-1, 64))]
        ids = np.random.default_rng(0).integers(0, 1000, (2, 512))
        with torch.inference_mode():
            expected = model(torch.from_numpy(ids)).numpy()
        np.testing.assert_allclose(client.predict("att", ids), expected, rtol=1e-4, atol=1e-6)
        long = np.zeros((1, 4096), dtype=np.int64)
        expect(EXHAUSTED, lambda: client.predict("att", long), "1x4096", "max_predict_bytes")
    with pytest.raises(ValueError, match=r"architecture bad: input_shape \(3, -1\)"):
        ArchitectureCatalog(["bad=helpers.models:badly_declared"])


def test_a_cpu_version_counts_its_largest_warm_up_batch_as_workspace(settings: Settings) -> None:
    """On the CPU, which keeps no allocator peak, the workspace a version counts against
    the device budget (beyond its weights, in `device_bytes`) is its measured activations
    for its largest warm-up batch: what the in-process model's tensors hold for that
    batch, attention's scores included. (The largest inputs plus outputs of one layer,
    the estimate before, saw the layers but not the scores between them: a ninth.)"""
    warm, args = (2, 512), {"width": 64}
    with running(settings) as server, ModelHostClient(server.target, timeout=120) as client:
        model = serve(client, "cold", architecture="attention", architecture_args=args)
        serve(
            client,
            "warm",
            model,
            architecture="attention",
            architecture_args=args,
            checkpoint="cold",
            overwrite=True,
            warmup_shape=warm,
        )
        workspace = client.get_model("warm").device_bytes - client.get_model("cold").device_bytes
    real = one_row_peak(model, torch.zeros(warm, dtype=torch.long))
    assert workspace == pytest.approx(real, rel=0.03)


def _meta_peak(architecture: str, args: dict[str, object], *inputs: tuple[int, ...]) -> int:
    """What the architecture's tensors hold for zeros of these shapes (on the meta device:
    the same tensors as a real run, no memory)."""
    module = ArchitectureCatalog([]).get(architecture).skeleton(dict(args)).eval()
    zeros = [torch.zeros(shape, device="meta") for shape in inputs]
    with torch.inference_mode(), LiveTensors() as live:
        module(*zeros)
    return live.peak


@pytest.mark.parametrize(
    ("architecture", "args", "shape"),
    [
        ("resnet50", {}, (1, 3, 1, 65536)),
        ("resnet50", {}, (256, 3, 4, 4)),
        ("fcn_resnet50", {"num_classes": 5, "weights_backbone": None}, (1, 3, 2, 32768)),
        ("shufflenet_v2_x2_0", {}, (1, 3, 1, 65536)),
        ("swin_t", {}, (64, 3, 8, 8)),
        ("fcn_resnet50", {"num_classes": 5, "weights_backbone": None}, (64, 3, 9, 9)),
        ("mc3_18", {}, (1, 3, 512, 1, 1)),
        ("swin3d_t", {}, (2, 3, 33, 32, 32)),
    ],
)
def test_thin_and_tiny_rows_are_estimated_at_what_they_take(
    architecture: str, args: dict[str, object], shape: tuple[int, ...]
) -> None:
    """A feature map is never less than a pixel high and a Swin window never smaller than
    7 x 7 tokens: one-pixel-high images took 2 to 10 times, tiny ones up to 300 times, an
    estimate from square ones (red team 10, M1 and M2); images small in both dimensions
    (9 x 9 maps rounded up to 16 x 16) and videos thin in two (T x 1 x 1) 3 to 5 times
    (red team 11, M1). The load also measures the smallest size the model takes (a
    row's floor), one thin row per open dimension and, for a video, one per pair."""
    inputs = [InputSpec("input", torch.float32, (-1, 3, *[-1] * (len(shape) - 2)))]
    spec = LoadSpec("m", architecture, dict(args), "w", torch.device("cpu"), None)
    cost = probe_skeleton(ArchitectureCatalog([]), spec, inputs, torch.float32).activations
    assert cost is not None
    real = _meta_peak(architecture, args, shape)
    assert real / 1.1 <= cost.estimate([shape]) <= real * 1.5


def test_raft_takes_two_named_images_and_is_bounded(settings: Settings) -> None:
    """RAFT had no known input, so nothing bounded it: two 1024 x 1024 images (25 MB)
    took 2.3 GB, its correlation volume growing with the square of the pixels; its
    `num_flow_updates` could be sent as an input (red team 10, H1 and H2). It takes
    `image1` and `image2` now, answers as in-process, and is measured past 224 pixels
    (where its square growth shows: a linear estimate from 224 would let 512 through)."""
    torch.manual_seed(0)
    model = torchvision.models.optical_flow.raft_small(weights=None).eval()
    limit = 100_000_000
    small = np.random.default_rng(0).standard_normal((1, 3, 128, 128)).astype(np.float32)
    big = np.zeros((1, 3, 512, 512), dtype=np.float32)  # 6 MB: 142 MB of tensors
    square = (1, 3, 224, 224)
    at_224 = _meta_peak("raft_small", {}, square, square) / (224 * 224)
    assert at_224 * 512 * 512 < limit < _meta_peak("raft_small", {}, big.shape, big.shape)
    limited = dataclasses.replace(settings, max_predict_bytes=limit)
    with running(limited) as server, ModelHostClient(server.target, timeout=120) as client:
        client.save_checkpoint("raft", model.state_dict())
        client.load_model("flow", architecture="raft_small", checkpoint="raft")
        info = client.get_model("flow")
        assert [(i.name, i.shape) for i in info.inputs] == [
            ("image1", (-1, 3, -1, -1)),
            ("image2", (-1, 3, -1, -1)),
        ]
        served = client.predict("flow", {"image1": small, "image2": small[:, ::-1].copy()})
        with torch.inference_mode():
            flows = model(torch.from_numpy(small), torch.from_numpy(small[:, ::-1].copy()))
        assert len(served) == len(flows) == 12
        for i, flow in enumerate(flows):
            np.testing.assert_allclose(served[str(i)], flow.numpy(), rtol=1e-3, atol=1e-3)
        expect(
            EXHAUSTED,
            lambda: client.predict("flow", {"image1": big, "image2": big}),
            "1x3x512x512, 1x3x512x512",
            "max_predict_bytes",
        )
        updates = np.array([1000], dtype=np.int64)
        expect(
            grpc.StatusCode.INVALID_ARGUMENT,
            lambda: client.predict(
                "flow", {"image1": small, "image2": small, "num_flow_updates": updates}
            ),
            "do not match the model's inputs",
        )


def test_a_model_that_takes_no_probe_size_is_measured_at_its_warmup_shape(
    settings: Settings,
) -> None:
    """A model that takes none of the sizes a load measures at (ViT of another
    image_size, MViT, here one that takes 48 x 48 only) was not bounded at all (red team
    10, M3). Its load is refused while max_predict_bytes is set, naming what to do; with
    a warmup_shape it takes it is measured there, and bounded; with the bound off it
    loads as before."""
    torch.manual_seed(0)
    model = fixed_size().eval()
    x = np.random.default_rng(0).standard_normal((2, 3, 48, 48)).astype(np.float32)
    row = one_row_peak(model, torch.zeros(1, 3, 48, 48))
    limited = dataclasses.replace(settings, max_predict_bytes=int(4.5 * row))
    with running(limited) as server, ModelHostClient(server.target, timeout=120) as client:
        client.save_checkpoint("fixed", model.state_dict())
        expect(
            grpc.StatusCode.FAILED_PRECONDITION,
            lambda: client.load_model("m", architecture="fixed_size", checkpoint="fixed"),
            "its activations could not be measured",
            "give a warmup_shape it takes",
            "max_predict_bytes 0",
        )
        client.load_model(
            "m", architecture="fixed_size", checkpoint="fixed", warmup_shape=(2, 3, 48, 48)
        )
        np.testing.assert_allclose(client.predict("m", x), reference(model, x), rtol=1e-5)
        expect(EXHAUSTED, lambda: client.predict("m", np.zeros((5, 3, 48, 48), np.float32)))
    unbounded = dataclasses.replace(settings, max_predict_bytes=0)
    with running(unbounded) as server, ModelHostClient(server.target, timeout=120) as client:
        client.load_model("m", architecture="fixed_size", checkpoint="fixed")
        np.testing.assert_allclose(client.predict("m", x), reference(model, x), rtol=1e-5)


def test_preprocessing_uint8_images_counts_against_the_bound(
    bounded: tuple[Server, ModelHostClient, int],
) -> None:
    """A resize converts a whole uint8 image to float32 first: a 192 MB image took 1.1 GB
    against an estimate from its preprocessed size (red team 10, L1). Preprocessing's
    bytes count too; a small image answers as before."""
    _, client, _ = bounded
    serve(client, "r18", preprocessing={"resize": 32, "crop": 32})
    small = np.zeros((1, 3, 40, 40), dtype=np.uint8)
    assert client.predict("r18", small).shape == (1, 10)
    large = np.zeros((1, 3, 1000, 1000), dtype=np.uint8)
    expect(EXHAUSTED, lambda: client.predict("r18", large), "for its images", "max_predict_bytes")
