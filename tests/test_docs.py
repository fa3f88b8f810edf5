"""README stays true: its settings table, metrics and commands match the code."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

from modelhost.cli import command_names
from modelhost.server.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_settings_table_is_generated_from_the_settings() -> None:
    spec = importlib.util.spec_from_file_location(
        "settings_table", ROOT / "scripts" / "settings_table.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["settings_table"] = module
    spec.loader.exec_module(module)
    documented = README.split("<!-- settings-table -->")[1].split("<!-- /settings-table -->")[0]
    assert documented.strip() == module.settings_table().strip(), (
        "README's configuration table is stale: paste `python scripts/settings_table.py`"
    )


def test_every_metric_is_documented() -> None:
    metrics = Metrics()
    exposed = {
        m.name + "_total" if m.type == "counter" else m.name for m in metrics.registry.collect()
    } | {"modelhost_queue_depth", "modelhost_model_device_bytes"}
    documented = set(re.findall(r"`(modelhost_[a-z_]+)`", README))
    assert exposed <= documented, exposed - documented


def test_every_command_is_documented() -> None:
    for command in command_names():
        assert f"| `{command}" in README, command


def test_the_two_commands() -> None:
    assert "make serve" in README and "make test" in README
    assert "make test" in (ROOT / ".ci" / "run").read_text()
