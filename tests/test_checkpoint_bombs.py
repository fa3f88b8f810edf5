"""Checkpoint zip bombs and upload lies: refused from the zip's central directory and the
upload's header, before anything is inflated or written past what was announced."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import os
import struct
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import safetensors.torch
import torch

from conftest import build, expect, reference, temp_files
from helpers.memory import peak_growth_mib
from modelhost.client import ModelHostClient, archives
from modelhost.server import Server, formats
from modelhost.server.errors import InvalidCheckpoint
from modelhost.server.store import CheckpointRecord
from modelhost.v1 import modelhost_pb2 as pb

IA = grpc.StatusCode.INVALID_ARGUMENT
MIB = 1 << 20
X = np.ones((2, 4), np.float32)
SAVE = "/modelhost.v1.ModelHost/SaveCheckpoint"


def deflate_bomb(declared_mib: int) -> bytes:
    """A torch.save archive of {"w": zeros(4)} whose data.pkl is DEFLATE-compressed: the
    real pickle, then `declared_mib` MiB of zeros that torch would inflate (and ignore)
    in memory. About 1 KiB per declared MiB, built without compressing the zeros."""
    saved = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, saved)
    source = zipfile.ZipFile(saved)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for info in source.infolist():
            data = source.read(info.filename)
            if not info.filename.endswith("/data.pkl"):
                archive.writestr(info, data)
                continue
            squeeze = zlib.compressobj(9, zlib.DEFLATED, -15)  # a raw DEFLATE stream
            zeros = bytes(MIB)
            head = squeeze.compress(data) + squeeze.flush(zlib.Z_FULL_FLUSH)
            block = squeeze.compress(zeros) + squeeze.flush(zlib.Z_FULL_FLUSH)  # repeatable
            crc = zlib.crc32(data)
            for _ in range(declared_mib):
                crc = zlib.crc32(zeros, crc)
            entry = zipfile.ZipInfo(info.filename)
            archive.writestr(entry, head + block * declared_mib + squeeze.flush())
            # Its central directory entry (what readers trust) says what the stream holds.
            entry.compress_type = zipfile.ZIP_DEFLATED
            entry.file_size = len(data) + declared_mib * MIB
            entry.CRC = crc
    return out.getvalue()


def refused_cheaply(call: Callable[[], Any], *words: str) -> None:
    """`call` fails INVALID_ARGUMENT naming `words`, within 3 s and 100 MiB (inflating the
    bomb would take seconds and gigabytes)."""
    started = time.perf_counter()
    growth = peak_growth_mib(lambda: expect(IA, call, *words))
    seconds = time.perf_counter() - started
    assert growth < 100, f"peak memory rose by {growth} MiB"
    assert seconds < 3, f"took {seconds:.2f} s"


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """A 1 GiB bomb (about 1 MiB), and proof that it is a real one."""
    blob = deflate_bomb(1024)
    assert len(blob) < 2 * MIB
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        (name,) = (n for n in archive.namelist() if n.endswith("/data.pkl"))
        assert archive.getinfo(name).file_size > 1024 * MIB
        with archive.open(name) as member:  # the stream inflates: a little is enough
            assert member.read(4 * MIB).endswith(bytes(MIB))
    return blob


@pytest.fixture
def tiny(client: ModelHostClient) -> torch.nn.Module:
    """tiny_mlp served as "tiny": it must keep serving whatever else is refused."""
    model = build("tiny_mlp")
    client.save_checkpoint("tiny", model.state_dict())
    client.load_model("tiny", architecture="tiny_mlp", checkpoint="tiny")
    return model


def check_still_serving(client: ModelHostClient, model: torch.nn.Module) -> None:
    np.testing.assert_allclose(client.predict("tiny", X), reference(model, X), rtol=1e-5)


# Zip bombs


def test_a_bomb_upload_is_refused_before_anything_is_inflated(
    client: ModelHostClient, server: Server, tiny: torch.nn.Module, bomb: bytes
) -> None:
    refused_cheaply(lambda: client.save_checkpoint("bomb", bomb), "zip bomb", "uncompressed")
    assert [c.name for c in client.list_checkpoints()] == ["tiny"]
    assert temp_files(server.settings.store) == []
    check_still_serving(client, tiny)


def test_a_bomb_already_in_the_store_is_refused_at_load(
    client: ModelHostClient, server: Server, tiny: torch.nn.Module, bomb: bytes
) -> None:
    """Bytes that reached the store another way (an older server, a copy) are checked at
    every load, not only at upload."""
    plant(server, "bomb", bomb)
    refused_cheaply(
        lambda: client.load_model("b", architecture="tiny_mlp", checkpoint="bomb"), "zip bomb"
    )
    assert [m.name for m in client.list_models()] == ["tiny"]
    check_still_serving(client, tiny)


def plant(server: Server, name: str, blob: bytes) -> None:
    """Puts `blob` in the store as checkpoint `name` the way an older server would have."""
    store = server.settings.store
    sha = hashlib.sha256(blob).hexdigest()
    record = CheckpointRecord(name, sha, len(blob), formats.STATE_DICT, 1, time.time())
    for path, data in (
        (store / "blobs" / sha, blob),
        (store / "checkpoints" / f"{name}.json", json.dumps(dataclasses.asdict(record)).encode()),
    ):
        path.write_bytes(data)
        os.chmod(path, 0o600)
    assert client_sees(server, name) == sha


def client_sees(server: Server, name: str) -> str:
    with ModelHostClient(server.target) as own:
        return own.get_checkpoint(name).sha256


def test_the_client_checks_a_download_it_loads_in_memory(
    client: ModelHostClient, server: Server, bomb: bytes, tmp_path: Path
) -> None:
    """A bomb in the store is not the client's to inflate: download_checkpoint without
    `dest` checks the archive before torch.load (with `dest` it only writes the bytes)."""
    plant(server, "bomb", bomb)

    def download() -> None:
        with pytest.raises(archives.UnsafeArchive, match="zip bomb"):
            client.download_checkpoint("bomb")

    growth = peak_growth_mib(download)
    assert growth < 100, f"peak memory rose by {growth} MiB"
    assert client.download_checkpoint("bomb", tmp_path / "bomb.pt").read_bytes() == bomb
    model = build("tiny_mlp")
    client.save_checkpoint("fine", model.state_dict())
    loaded = client.download_checkpoint("fine")
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_every_reader_checks_the_archive(tmp_path: Path, bomb: bytes) -> None:
    path = tmp_path / "bomb.pt"
    path.write_bytes(bomb)
    readers: list[Callable[[], Any]] = [
        lambda: formats.inspect(path),
        lambda: formats.inspect(path, allow_pickled=True),
        lambda: formats.read_weights(path, formats.STATE_DICT),
        lambda: formats.read_weights(path, formats.GENERAL_CHECKPOINT),
        lambda: formats.load_torch(path),
        lambda: formats.load_pickled_model(path),
        lambda: formats.load_exported_program(path),
    ]
    for read in readers:
        with pytest.raises(InvalidCheckpoint, match="zip bomb"):
            read()


def test_a_bomb_inside_an_exported_program_is_refused(tmp_path: Path, bomb: bytes) -> None:
    """torch.export.load calls torch.load on entries of its archive (sample inputs,
    pickled weights): an archive in an entry is checked too."""
    program = torch.export.export(build("tiny_mlp"), (torch.ones(2, 4),))
    good = tmp_path / "good.pt2"
    torch.export.save(program, good)
    assert formats.inspect(good, allow_pickled=True).format == formats.EXPORTED_PROGRAM
    bad = tmp_path / "bad.pt2"
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(bad, "w") as archive:
        names = [n for n in source.namelist() if n.endswith("/sample_inputs/model.pt")]
        assert names, source.namelist()
        for info in source.infolist():
            archive.writestr(info, bomb if info.filename in names else source.read(info))
    for read in (
        lambda: formats.inspect(bad, allow_pickled=True),
        lambda: formats.load_exported_program(bad),
    ):
        with pytest.raises(InvalidCheckpoint, match=f"zip bomb: the entries of .*{names[0]}"):
            read()


def test_the_pickle_of_an_archive_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "many.pt"
    torch.save({f"w{i}": torch.zeros(1) for i in range(100)}, path)
    assert formats.inspect(path).tensor_count == 100
    monkeypatch.setattr(archives, "MAX_PICKLE_BYTES", 1000)
    with pytest.raises(InvalidCheckpoint, match=r"pickle \(many/data.pkl\) of \d+ bytes"):
        formats.inspect(path)


def test_an_archive_of_very_many_entries_is_refused_before_its_directory_is_parsed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """zipfile builds an object per entry of the central directory: its size, as the end
    record declares it, is bounded before anything is parsed (zip64's record included,
    and an end record whose own fields hold its signature: the one both readers find)."""
    path = tmp_path / "many.pt"
    torch.save({f"w{i}": torch.zeros(1) for i in range(100)}, path)
    data = path.read_bytes()
    end = len(data) - 22
    (directory,) = struct.unpack_from("<I", data, end + 12)
    monkeypatch.setattr(archives, "MAX_CENTRAL_DIRECTORY", directory - 1)
    with pytest.raises(
        InvalidCheckpoint, match=f"directory of entries of the archive takes {directory}"
    ):
        formats.inspect(path)
    # Its offset field reading "PK\x05\x06": a search for the last signature lands there.
    inner = tmp_path / "inner.pt"
    inner.write_bytes(data[: end + 16] + b"PK\x05\x06" + data[end + 20 :])
    with pytest.raises(InvalidCheckpoint, match="directory of entries of the archive takes"):
        formats.check_archive(inner)
    # zip64: the end record says 0xFFFFFFFF, the zip64 record (found through its
    # locator, just before the end record) says how big the directory really is.
    zip64 = b"PK\x06\x06" + (44).to_bytes(8, "little") + bytes(28)
    zip64 += (1 << 40).to_bytes(8, "little") + bytes(8)
    locator = b"PK\x06\x07" + bytes(4) + (0).to_bytes(8, "little") + (1).to_bytes(4, "little")
    end_record = b"PK\x05\x06" + bytes(4) + b"\xff" * 12 + bytes(2)
    crafted = tmp_path / "zip64.pt"
    crafted.write_bytes(zip64 + locator + end_record)
    with pytest.raises(InvalidCheckpoint, match=f"takes {1 << 40} bytes"):
        formats.check_archive(crafted)


def test_an_archive_with_two_directories_is_refused(tmp_path: Path) -> None:
    """zipfile reads the directory just before the end record, torch's reader the one at
    the offset the record declares: a file with two would show each a different archive
    (a harmless one to the check, a bomb to torch.load)."""
    path = tmp_path / "two.pt"
    torch.save({"w": torch.zeros(4)}, path)
    data = path.read_bytes()
    end = len(data) - 22
    size, offset = struct.unpack_from("<II", data, end + 12)
    path.write_bytes(data[: offset + size] + data[offset : offset + size] + data[end:])
    with pytest.raises(InvalidCheckpoint, match="not where its end record says"):
        formats.inspect(path)


def test_compressed_entries_are_refused(tmp_path: Path) -> None:
    saved = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, saved)
    path = tmp_path / "deflated.pt"
    with zipfile.ZipFile(saved) as source, zipfile.ZipFile(path, "w") as archive:
        for info in source.infolist():
            archive.writestr(info.filename, source.read(info), zipfile.ZIP_DEFLATED)
    with pytest.raises(InvalidCheckpoint, match="compressed entries"):
        formats.inspect(path)


def test_entries_sharing_their_bytes_count_once_each(tmp_path: Path) -> None:
    """Central directory entries that all point at the same stored bytes (no compression
    at all) would make torch read them again and again: they expand past the file too."""
    saved = io.BytesIO()
    torch.save({"w": torch.zeros(1 << 16)}, saved)  # a 256 KiB storage
    path = tmp_path / "overlap.pt"
    with zipfile.ZipFile(saved) as source, zipfile.ZipFile(path, "w") as archive:
        for info in source.infolist():
            archive.writestr(info, source.read(info))
        (storage,) = (i for i in archive.infolist() if i.filename.endswith("/data/0"))
        archive.filelist += [copy.copy(storage) for _ in range(20)]
    with pytest.raises(InvalidCheckpoint, match="zip bomb"):
        formats.inspect(path)


@pytest.mark.parametrize("kind", ["state_dict", "general", "pickled", "safetensors"])
def test_what_torch_and_safetensors_write_passes(tmp_path: Path, kind: str) -> None:
    model = build("tiny_mlp")
    path = tmp_path / "file"
    if kind == "safetensors":
        safetensors.torch.save_file(model.state_dict(), path)
    elif kind == "general":
        optimizer = torch.optim.Adam(model.parameters())
        model(torch.ones(2, 4)).sum().backward()
        optimizer.step()
        state = {"epoch": 3, "model_state_dict": model.state_dict(), "loss": 0.5}
        torch.save({**state, "optimizer_state_dict": optimizer.state_dict()}, path)
    else:
        torch.save(model if kind == "pickled" else model.state_dict(), path)
    contents = formats.inspect(path, allow_pickled=True)
    expected = {"general": "general_checkpoint", "pickled": "pickled_model"}
    assert contents.format == expected.get(kind, kind)
    if kind != "pickled":
        assert set(formats.read_weights(path, contents.format)) == set(model.state_dict())


# Upload lies


def upload_header(**upload: Any) -> pb.SaveCheckpointRequest:
    return pb.SaveCheckpointRequest(
        header=pb.SaveCheckpointHeader(name="lie", upload=pb.Upload(**upload))
    )


def saved_tiny() -> bytes:
    data = io.BytesIO()
    torch.save(build("tiny_mlp").state_dict(), data)
    return data.getvalue()


def call_then_stall(server: Server, messages: list[pb.SaveCheckpointRequest]) -> grpc.RpcError:
    """Sends `messages`, then nothing more without ending the stream; the call's error,
    which must come while the caller is still stalled (within 10 s)."""
    stalled = threading.Event()

    def requests() -> Iterator[pb.SaveCheckpointRequest]:
        yield from messages
        stalled.wait(30)

    with grpc.insecure_channel(server.target) as channel:
        call = channel.stream_unary(
            SAVE,
            request_serializer=pb.SaveCheckpointRequest.SerializeToString,
            response_deserializer=pb.CheckpointInfo.FromString,
        )
        future = call.future(requests(), timeout=60)
        try:
            error = future.exception(timeout=10)
        except grpc.FutureTimeoutError:
            future.cancel()
            raise AssertionError("the server waits for more bytes instead of answering") from None
        finally:
            stalled.set()
    assert isinstance(error, grpc.RpcError), error
    return error


def test_an_upload_past_its_announced_size_fails_at_once(server: Server) -> None:
    chunk = pb.SaveCheckpointRequest(chunk=bytes(MIB))
    error = call_then_stall(server, [upload_header(size_bytes=100), chunk])
    assert error.code() == IA, error
    assert "announced 100 bytes but sent at least" in str(error.details())
    assert temp_files(server.settings.store) == []


@pytest.mark.parametrize("sha", ["ZZ", "0" * 63, "0" * 65, "g" * 64, " " + "0" * 63])
def test_a_malformed_sha256_is_refused_before_the_body(server: Server, sha: str) -> None:
    error = call_then_stall(server, [upload_header(sha256=sha)])
    assert error.code() == IA, error
    assert "is not 64 hexadecimal digits" in str(error.details())


def test_a_negative_size_is_refused_before_the_body(server: Server) -> None:
    error = call_then_stall(server, [upload_header(size_bytes=-1)])
    assert error.code() == IA, error
    assert "negative" in str(error.details())


def test_announced_sizes_and_sha256_in_either_case_are_accepted(
    client: ModelHostClient, server: Server
) -> None:
    data = saved_tiny()
    sha = hashlib.sha256(data).hexdigest()
    for name, announced in (("lower", sha), ("upper", sha.upper())):
        half = len(data) // 2
        messages = [
            pb.SaveCheckpointRequest(
                header=pb.SaveCheckpointHeader(
                    name=name, upload=pb.Upload(size_bytes=len(data), sha256=announced)
                )
            ),
            pb.SaveCheckpointRequest(chunk=data[:half]),
            pb.SaveCheckpointRequest(chunk=data[half:]),
        ]
        with grpc.insecure_channel(server.target) as channel:
            call = channel.stream_unary(
                SAVE,
                request_serializer=pb.SaveCheckpointRequest.SerializeToString,
                response_deserializer=pb.CheckpointInfo.FromString,
            )
            assert call(iter(messages), timeout=30).sha256 == sha
    assert [c.name for c in client.list_checkpoints()] == ["lower", "upper"]
