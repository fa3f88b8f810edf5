"""The committed stubs are exactly what the proto generates; the contract's names hold."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from modelhost.v1 import modelhost_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]


def test_generated_stubs_match_the_proto(tmp_path: Path) -> None:
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_protos.sh"), str(tmp_path)],
        check=True,
        env={**os.environ, "PYTHON": sys.executable},
        cwd=ROOT,
    )
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated, "nothing was generated"
    for relative in generated:
        committed = ROOT / "client" / relative
        assert committed.exists(), f"{relative} is generated but not committed"
        assert committed.read_bytes() == (tmp_path / relative).read_bytes(), (
            f"{relative} drifted from the proto: run `make protos` and commit"
        )


def test_contract_names() -> None:
    service = pb.DESCRIPTOR.services_by_name["ModelHost"]
    assert service.full_name == "modelhost.v1.ModelHost"
    methods = {m.name: m for m in service.methods}
    save = methods["SaveCheckpoint"]
    assert save.client_streaming and save.output_type.name == "CheckpointInfo"
    assert methods["DownloadCheckpoint"].server_streaming
    assert methods["LoadModel"].output_type.name == "ModelInfo"
    assert methods["GetModel"].output_type.name == "ModelInfo"
    for name in (
        "ListCheckpoints",
        "DeleteCheckpoint",
        "Predict",
        "UnloadModel",
        "ListModels",
        "ListArchitectures",
    ):
        assert name in methods
    info = pb.CheckpointInfo.DESCRIPTOR.fields_by_name
    assert {"name", "size_bytes", "sha256", "format", "metadata", "created"} <= set(info)
    tensor = pb.Tensor.DESCRIPTOR.fields_by_name
    assert tensor["data"].type == tensor["data"].TYPE_BYTES


@pytest.mark.parametrize(
    "proto", sorted((ROOT / "protos").rglob("*.proto")), ids=lambda p: p.parent.name + "/" + p.name
)
def test_every_message_and_field_is_documented(proto: Path) -> None:
    text = proto.read_text().splitlines()
    undocumented = []
    for index, line in enumerate(text):
        stripped = line.strip()
        declares = stripped.startswith(("message ", "enum ", "rpc ", "service ")) or (
            stripped.endswith(";")
            and "=" in stripped
            and not stripped.startswith(("option", "syntax", "package", "import", "//"))
        )
        if declares and not text[index - 1].strip().startswith("//"):
            undocumented.append(f"line {index + 1}: {stripped}")
    oneof_free = [u for u in undocumented if "oneof" not in u]
    assert oneof_free == []
