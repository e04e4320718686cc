"""The UI's login sources: one given, never empty, never two at once."""

from __future__ import annotations

import pytest

from qlora_platform.errors import UserError
from qlora_platform.ui.login import ENV, gather_auth


def test_sources(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert gather_auth(None, None) is None
    assert gather_auth("ann:s3cret:with:colons", None) == ("ann", "s3cret:with:colons")
    monkeypatch.setenv(ENV, "bob:pw")
    assert gather_auth(None, None) == ("bob", "pw")
    with pytest.raises(UserError, match="given twice"):
        gather_auth("ann:x", None)
    monkeypatch.delenv(ENV)
    file = tmp_path / "login"
    file.write_text("carol:pw\n")
    assert gather_auth(None, str(file)) == ("carol", "pw")


@pytest.mark.parametrize("value", ["", "ann", "ann:", ":pw", "  "])
def test_an_empty_login_is_an_error_not_no_login(value, monkeypatch, tmp_path):
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(UserError, match="USER:PASSWORD"):
        gather_auth(value, None)
    monkeypatch.setenv(ENV, value)
    with pytest.raises(UserError, match=rf"\${ENV}"):
        gather_auth(None, None)
    monkeypatch.delenv(ENV)
    file = tmp_path / "login"
    file.write_text(value)
    with pytest.raises(UserError, match="--auth-file"):
        gather_auth(None, str(file))


def test_an_unreadable_login_file_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    binary = tmp_path / "login"
    binary.write_bytes(b"\xff\xfe ann:pw")
    with pytest.raises(UserError, match=r"^--auth-file: cannot read .* \(not UTF-8 text\)"):
        gather_auth(None, str(binary))
    with pytest.raises(UserError, match=r"^--auth-file: cannot read"):
        gather_auth(None, str(tmp_path))  # a folder
