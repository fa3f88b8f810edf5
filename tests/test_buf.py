"""The protos as a product: `buf lint` passes and nothing breaks the released API.

The baseline is releases/modelhost-v1.binpb, a buf image of protos/ as last
released, committed so that a clean clone (no git history) can run the check.
After a release, rebuild it: `buf build --exclude-source-info -o releases/modelhost-v1.binpb`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RELEASED = ROOT / "releases" / "modelhost-v1.binpb"


def _buf() -> str:
    beside_python = Path(sys.executable).with_name("buf")
    found = str(beside_python) if beside_python.exists() else shutil.which("buf")
    if found is None:
        pytest.skip("no buf binary: pip install buf-bin (in the dev extra)")
    try:
        subprocess.run([found, "--version"], check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as error:
        pytest.skip(f"buf cannot run here: {error}")
    return found


def buf(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    command = [_buf(), *map(str, args)]
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )


def test_lint() -> None:
    run = buf("lint")
    assert run.returncode == 0, run.stdout + run.stderr


def test_no_breaking_change_against_the_released_protos() -> None:
    run = buf("breaking", "--against", RELEASED)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_breaking_check_catches_a_renumbered_field(tmp_path: Path) -> None:
    copy = tmp_path / "protos"
    shutil.copytree(ROOT / "protos", copy)
    shutil.copy(ROOT / "buf.yaml", tmp_path)
    proto = copy / "modelhost" / "v1" / "modelhost.proto"
    text = proto.read_text()
    assert "  bytes data = 3;" in text
    proto.write_text(text.replace("  bytes data = 3;", "  bytes data = 4;"))
    run = buf("breaking", "--against", RELEASED, cwd=tmp_path)
    assert run.returncode != 0
    assert 'field "3" with name "data" on message "Tensor" was deleted' in run.stdout


def test_lint_holds_new_files_to_the_standard(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    shutil.copy(ROOT / "buf.yaml", tmp_path)
    extra = tmp_path / "protos" / "modelhost" / "v1" / "extra.proto"
    extra.write_text(
        'syntax = "proto3";\npackage modelhost.v1;\nmessage Extra { int32 badName = 1; }\n'
    )
    run = buf("lint", cwd=tmp_path)
    assert run.returncode != 0
    assert 'Field name "badName" should be lower_snake_case' in run.stdout
