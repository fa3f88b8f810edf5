"""Prints README's configuration table from the settings' help (tests/test_docs.py checks it)."""

from __future__ import annotations

from modelhost.server.settings import ENV_PREFIX, settings_fields, shown_default


def settings_table() -> str:
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for name, kind, default, help in settings_fields():
        flag = "--" + name.replace("_", "-")
        if kind == list[str]:
            flag = flag.removesuffix("s")
        if kind is bool:
            flag = "--[no-]" + flag.removeprefix("--")
        shown = shown_default(kind, default)
        rows.append(f"| `{flag}` | `{ENV_PREFIX}{name.upper()}` | {shown} | {help} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_table())
