"""Dashboard sessions and the operator token (gateway/api/sessions.py): a pure core, tested without a server."""

from __future__ import annotations

import os

import pytest

from llorch.gateway.api.sessions import (SessionBook, check_operator_token, new_operator_token, operator_token_current,
                                         operator_token_file)
from llorch.gateway.errors import AuthError, BadRequest

KEY = bytes(range(32))


def test_a_session_is_found_only_by_its_signed_cookie_of_its_kind_until_it_expires():
    book = SessionBook(KEY, lifetime_ms=1_000)
    cookie, session = book.open("tenant", "alice", "ab" * 32, now_ms=0)
    assert book.find(cookie, "tenant", 999) == session
    assert book.find(cookie, "operator", 10) is None                   # a tenant session is no operator session
    session_id, tag = cookie.split(".")
    assert book.find(f"{session_id}.{'0' * len(tag)}", "tenant", 10) is None     # forged tag
    assert book.find(session_id, "tenant", 10) is None and book.find(None, "tenant", 10) is None
    assert SessionBook(bytes(32)).find(cookie, "tenant", 10) is None  # another gateway's key
    assert book.find(cookie, "tenant", 1_000) is None                 # the server's expiry, whatever the browser
    assert book.find(cookie, "tenant", 10) is None                    # and it stays gone


def test_sign_out_ends_a_session_and_the_oldest_go_first_beyond_the_cap():
    book = SessionBook(KEY, sessions_max=2)
    cookies = [book.open("tenant", name, "00" * 32, 0)[0] for name in ("a", "b", "c")]
    assert book.find(cookies[0], "tenant", 1) is None and book.find(cookies[2], "tenant", 1) is not None
    book.close(book.find(cookies[2], "tenant", 1))
    assert book.find(cookies[2], "tenant", 1) is None


def test_csrf_tokens_are_per_session():
    book = SessionBook(KEY)
    _, first = book.open("operator", "operator", "00" * 32, 0)
    _, second = book.open("operator", "operator", "00" * 32, 0)
    book.check_csrf(first, book.csrf_token(first))
    for presented in (None, "", book.csrf_token(second), book.csrf_token(first)[:-1]):
        with pytest.raises(BadRequest, match="CSRF"):
            book.check_csrf(first, presented)


def test_the_operator_token_is_kept_hashed_0600_and_a_new_one_replaces_it(tmp_path):
    db = tmp_path / "gateway.sqlite"
    with pytest.raises(AuthError, match="no operator token yet"):
        check_operator_token(db, "anything")
    token = new_operator_token(db)
    stored = operator_token_file(db)
    assert token not in stored.read_text() and os.stat(stored).st_mode & 0o777 == 0o600
    credential = check_operator_token(db, token)
    with pytest.raises(AuthError, match="incorrect operator token"):
        check_operator_token(db, token + "x")
    with pytest.raises(AuthError, match="incorrect operator token"):
        check_operator_token(db, "")
    assert operator_token_current(db, credential)
    new_operator_token(db)
    assert not operator_token_current(db, credential)               # old sessions end with the old token
    stored.chmod(0o644)
    with pytest.raises(AuthError, match="readable by others"):
        check_operator_token(db, token)
