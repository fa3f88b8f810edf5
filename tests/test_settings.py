"""Settings out of their range stop the start with one line naming the flag and its
variable, whether they come from flags or from the environment."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from modelhost.cli import main
from modelhost.server import Settings
from modelhost.server.settings import parse_value

REFUSED = [
    ("max_batch_size", 0, "--max-batch-size (MODELHOST_MAX_BATCH_SIZE) must be 1 to 65,536"),
    ("max_queue_size", 0, "--max-queue-size (MODELHOST_MAX_QUEUE_SIZE) must be 1 to"),
    ("load_workers", 0, "--load-workers (MODELHOST_LOAD_WORKERS) must be 1 to 1,024"),
    ("chunk_bytes", 0, "--chunk-bytes (MODELHOST_CHUNK_BYTES) must be 1 to 2,147,483,647"),
    ("port", 70000, "--port (MODELHOST_PORT) must be 0 to 65,535, not 70000"),
    ("request_read_timeout", 0.0, "--request-read-timeout (MODELHOST_REQUEST_READ_TIMEOUT)"),
    ("device_memory_budget", -1.0, "--device-memory-budget (MODELHOST_DEVICE_MEMORY_BUDGET)"),
    ("max_predict_bytes", -1, "--max-predict-bytes (MODELHOST_MAX_PREDICT_BYTES) must be at"),
    ("log_level", "verbose", "--log-level (MODELHOST_LOG_LEVEL) must be one of debug, info"),
]


@pytest.mark.parametrize(("name", "value", "message"), REFUSED)
def test_a_setting_out_of_its_range_is_refused(name: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        dataclasses.replace(Settings(), **{name: value})


def test_the_edges_of_each_range_are_taken() -> None:
    Settings(port=65535, max_batch_size=65536, max_queue_delay_us=0, log_level="DEBUG")
    Settings(max_concurrent_rpcs=0, max_predict_bytes=0, device_memory_budget=0.5)


def test_a_bad_variable_stops_the_start_with_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELHOST_MAX_BATCH_SIZE", "0")
    assert main(["serve", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --max-batch-size (MODELHOST_MAX_BATCH_SIZE) must be"), err
    assert err.count("\n") == 1, err


def test_a_bad_flag_stops_the_start_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--port", "0", "--gpu-lanes", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --gpu-lanes (MODELHOST_GPU_LANES) must be 1 to 1,024"), err


def test_a_boolean_flag_turns_off_what_its_variable_turned_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The Docker image sets MODELHOST_RESTORE=true: `serve --no-restore` turns it off."""
    from modelhost.cli import build_parser
    from modelhost.server.settings import settings_fields

    monkeypatch.setenv("MODELHOST_RESTORE", "true")
    for argv, restore in ((["serve"], True), (["serve", "--no-restore"], False)):
        args = build_parser().parse_args(argv)
        overrides = {name: getattr(args, name) for name, *_ in settings_fields()}
        assert Settings.from_env(**overrides).restore is restore
    assert build_parser().parse_args(["serve", "--no-insecure"]).insecure is False


def test_grpc_sizes_stay_within_int32() -> None:
    with pytest.raises(ValueError, match=r"--max-message-bytes .* must be 1 to 2,147,483,647"):
        Settings(max_message_bytes=1 << 31)
    Settings(max_message_bytes=(1 << 31) - 1, chunk_bytes=(1 << 31) - 1)
    with pytest.raises(ValueError, match=r"--max-streams-per-connection .* 0 to 2,147,483,647"):
        Settings(max_streams_per_connection=1 << 31)  # it was a raw OverflowError at start
    Settings(max_streams_per_connection=(1 << 31) - 1)


def test_a_size_with_a_unit_says_units_are_not_taken() -> None:
    """UX review 16, F16: "2GB" was only "not a valid float"."""
    with pytest.raises(ValueError, match="units are not accepted, give bytes"):
        parse_value(float, "2GB", "device_memory_budget")
    with pytest.raises(ValueError, match="units are not accepted"):
        parse_value(int, "512MiB", "max_receiving_bytes")
    with pytest.raises(ValueError) as plain:
        parse_value(float, "lots", "device_memory_budget")
    assert "units" not in str(plain.value)
