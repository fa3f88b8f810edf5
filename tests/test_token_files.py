"""Token files: one token per line; blank lines and comments (even indented) are not tokens."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grpc
import pytest

from modelhost.server import Settings
from modelhost.server.auth import Tokens

PREDICT = "/modelhost.v1.ModelHost/Predict"


def tokens_from(settings: Settings, tmp_path: Path, text: str) -> Tokens:
    path = tmp_path / "tokens"
    path.write_text(text)
    return Tokens.from_settings(dataclasses.replace(settings, token_file=str(path)))


def test_comments_are_not_tokens_however_indented(settings: Settings, tmp_path: Path) -> None:
    text = "# current\n  # old: rotated out\n\tnew-token  \n\n\t# retired\n  second-token\n"
    tokens = tokens_from(settings, tmp_path, text)
    assert tokens.inference == (b"new-token", b"second-token")
    assert tokens.verdict(PREDICT, b"new-token") is None
    for comment in (b"# old: rotated out", b"# retired", b"# current"):
        verdict = tokens.verdict(PREDICT, comment)
        assert verdict is not None and verdict[0] == grpc.StatusCode.UNAUTHENTICATED


def test_a_file_of_indented_comments_holds_no_token(settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="holds no token"):
        tokens_from(settings, tmp_path, "  # old\n\t# older\n   \n")
