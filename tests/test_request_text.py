"""A request as text to edit, and back: what "edit and replay" sends."""

from __future__ import annotations

import gzip

import pytest

from engine.flow import Body, Request
from engine.request_text import RequestTextError, request_to_text, text_to_request


def form_request() -> Request:
    return Request("POST", "http", "api.test:8080", "/submit?x=1", "HTTP/1.1",
                   [("Host", "api.test:8080"), ("Content-Type", "text/plain"),
                    ("Content-Length", "8"), ("Connection", "keep-alive"), ("X-Trace", "7")],
                   Body.of(b"name=ada"))


def test_the_text_is_an_http1_message_without_computed_headers() -> None:
    assert request_to_text(form_request()) == (
        "POST /submit?x=1 HTTP/1.1\nHost: api.test:8080\nContent-Type: text/plain\n"
        "X-Trace: 7\n\nname=ada")


def test_unchanged_text_gives_the_same_request_back() -> None:
    original = form_request()
    again = text_to_request(request_to_text(original), original)
    assert (again.method, again.path, again.authority, again.http_version) == (
        "POST", "/submit?x=1", "api.test:8080", "HTTP/1.1")
    assert again.headers == [("Host", "api.test:8080"), ("Content-Type", "text/plain"),
                             ("X-Trace", "7")]
    assert again.body.read() == b"name=ada"


def test_edits_reach_the_request_and_an_editors_final_newline_is_dropped() -> None:
    original = form_request()
    text = request_to_text(original).replace("POST /submit?x=1", "PUT /other")
    text = text.replace("X-Trace: 7", "X-Trace: 8\nX-New: yes").replace("ada", "bob") + "\n"
    edited = text_to_request(text, original)
    assert (edited.method, edited.path) == ("PUT", "/other")
    assert ("X-Trace", "8") in edited.headers and ("X-New", "yes") in edited.headers
    assert edited.body.read() == b"name=bob"


def test_http2_keeps_the_authority_out_of_its_headers() -> None:
    original = Request("GET", "https", "api.test", "/v1", "HTTP/2",
                       [("accept", "*/*"), ("te", "trailers")], Body())
    text = request_to_text(original)
    assert text == "GET /v1 HTTP/2\nHost: api.test\naccept: */*\n\n"
    edited = text_to_request(text.replace("Host: api.test", "Host: other.test"), original)
    assert edited.authority == "other.test" and edited.headers == [("accept", "*/*")]
    assert edited.http_version == "HTTP/2"


def test_an_encoded_body_is_edited_decoded_and_encoded_again() -> None:
    original = Request("POST", "https", "api.test", "/", "HTTP/1.1",
                       [("Content-Encoding", "gzip")], Body.of(gzip.compress(b'{"a": 1}')))
    text = request_to_text(original)
    assert text.endswith('\n\n{"a": 1}')
    edited = text_to_request(text.replace('"a": 1', '"a": 2'), original)
    assert gzip.decompress(edited.body.read()) == b'{"a": 2}'


def test_binary_or_partial_bodies_cannot_be_edited() -> None:
    binary = Request("POST", "http", "a", "/", "HTTP/1.1", [], Body.of(b"\xff\xfe\x00"))
    with pytest.raises(RequestTextError, match="not text"):
        request_to_text(binary)
    cut = Body(cap=4)
    cut.append(b"abcdefgh")
    partial = Request("POST", "http", "a", "/", "HTTP/1.1", [], cut)
    with pytest.raises(RequestTextError, match="kept only in part"):
        request_to_text(partial)


@pytest.mark.parametrize(("text", "message"), [
    ("GET\n\n", "METHOD TARGET"),
    ("GET / HTTP/3\n\n", "unknown HTTP version"),
    ("GET / HTTP/1.1\nno colon here\n\n", "not a header line"),
    ("GET / HTTP/1.1\n Folded: no\n\n", "not a header line"),
])
def test_text_that_is_not_a_request_is_refused(text: str, message: str) -> None:
    with pytest.raises(RequestTextError, match=message):
        text_to_request(text, form_request())
