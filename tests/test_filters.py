"""The filter language: every operator, precedence, quoting, errors, and a fuzz test."""

from __future__ import annotations

import gzip

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.filters import FilterError, parse
from engine.flow import FlowKind, FlowState
from tests.ui_fixtures import make_flow, raw_flow, sample_flows

FLOWS = sample_flows()
BY_ID = {f.id: f for f in FLOWS}


def ids(expr: str) -> list[int]:
    f = parse(expr)
    return [flow.id for flow in FLOWS if f(flow)]


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("", list(range(1, 12))),
        ("~all", list(range(1, 12))),
        ("~d www", [2]),
        ("~d ^cdn\\.", [6, 9]),
        ("~d db.example", [11]),  # raw flows match by their resolved name
        ("~u /v1/", [1, 3]),
        ("~u expand=items", [1]),
        ("~m post", [4]),
        ("~m ^GET$", [1, 2, 3, 5, 6, 7, 8, 9, 10]),
        ("~c 404", [5]),
        ("~c 500", [6]),
        ("~s", [1, 2, 3, 4, 5, 6, 9, 10]),
        ("~q", [7, 8]),
        ("~e", [7]),
        ("~websocket", [10]),
        ("~tcp", [11]),
        ("~dns", []),
        ("~http", list(range(1, 11))),
        ("~pid 4250", [9]),
        ("~t json", [1, 3]),
        ("~ts image", [9]),
        ("~tq form", [4]),
        ("~h cache-control", [1]),
        ("~hq form-urlencoded", [4]),
        ("~hs 'Location: /home'", [4]),
        ("~b Lovelace", [1]),
        ("~bs '\"ok\":true'", [3]),  # gzip-encoded body is searched decoded
        ("~bq password", [4]),
        ("~bs password", []),
        ("~b welcome", [10]),  # WebSocket messages count as body
    ],
)
def test_operators(expr: str, expected: list[int]) -> None:
    assert ids(expr) == expected


def test_negation_and_or() -> None:
    assert ids("!~s") == [7, 8, 11]
    assert ids("~c 404 | ~c 500") == [5, 6]
    assert ids("~d api & ~m GET") == [1, 3, 5]
    assert ids("~d api ~m GET") == [1, 3, 5]  # implicit and
    assert ids("!!~e") == [7]


def test_precedence() -> None:
    # & binds tighter than |; ! tighter than &.
    assert ids("~c 404 | ~d cdn & ~c 500") == [5, 6]
    assert ids("(~c 404 | ~d cdn) & ~c 500") == [6]
    assert ids("!~d api & ~s") == [2, 6, 9, 10]
    assert ids("!(~d api | ~d cdn) & ~s") == [2, 10]
    assert ids("~c 200 | ~c 302 ~m POST") == ids("~c 200 | (~c 302 & ~m POST)")


def test_plain_text_searches_url_headers_and_bodies() -> None:
    assert ids("logo") == [9]  # URL
    assert ids("NO-STORE") == [1]  # header value, case-insensitive
    assert ids("lovelace ada") == [1]  # two words: implicit and, in any order
    assert ids("'lovelace ada'") == []  # quoted: one phrase
    assert ids("'ada lovelace'") == [1]  # found in the JSON body
    assert ids('"count":3') == [3]  # decoded gzip body
    assert ids("count\\W+3") == [3]  # plain text is a regex
    assert ids("[unclosed") == []  # invalid regex: literal substring, no error


def test_invalid_regex_is_literal() -> None:
    flow = make_flow(1, path="/a[b")
    assert parse("a[b")(flow)
    assert parse("~u a[b")(flow)
    assert not parse("~u a[c")(flow)


def test_quotes_and_escapes() -> None:
    flow = make_flow(1, path='/say?q="hi there"')
    assert parse('~u "q=\\"hi there"')(flow)
    assert parse("~u 'hi there'")(flow)
    assert not parse("~u 'hi  there'")(flow)


def test_body_size_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.filters as filters

    body = b"x" * 5000 + b"needle"
    assert parse("needle")(make_flow(1, response_body=body))
    monkeypatch.setattr(filters, "BODY_SEARCH_LIMIT", 1000)
    assert not parse("needle")(make_flow(2, response_body=body))


def test_in_progress_flows_are_searched_live() -> None:
    flow = make_flow(1, status=None, duration=None)
    assert not parse("~bs late")(flow)
    flow.response = make_flow(2, response_body=b"late body").response
    assert parse("~bs late")(flow) and parse("late")(flow)
    flow.state = FlowState.DONE
    assert parse("late")(flow) and parse("late")(flow)  # cached from now on


def test_undecodable_body_is_searched_raw() -> None:
    flow = make_flow(1, response_headers=[("Content-Encoding", "gzip")],
                     response_body=b"not gzip at all: needle")
    assert parse("~bs needle")(flow)
    ok = make_flow(2, response_headers=[("Content-Encoding", "gzip")],
                   response_body=gzip.compress(b"hidden needle"))
    assert parse("~bs 'hidden needle'")(ok)


def test_inbound_matches_exchanges_to_a_published_port() -> None:
    flows = sample_flows()
    flows[1].conn.inbound = True
    match = parse("~inbound")
    assert [f.id for f in flows if match(f)] == [f.id for f in flows if f.conn is flows[1].conn]


def test_raw_flows_and_kinds() -> None:
    dns = raw_flow(1, FlowKind.DNS, port=53)
    udp = raw_flow(2, FlowKind.UDP, port=443)
    assert parse("~dns")(dns) and not parse("~dns")(udp)
    assert parse("~udp")(udp)
    assert not parse("~s")(dns) and not parse("~q")(dns)
    assert not parse("~u .")(dns)  # no URL
    assert parse("db.example")(dns)  # plain text: host of raw flows


@pytest.mark.parametrize(
    ("expr", "pos", "message"),
    [
        ("~x", 0, "unknown filter ~x"),
        ("~d", 2, "~d needs an argument"),
        ("~c abc", 3, "~c needs a number"),
        ("~pid", 4, "~pid needs an argument"),
        ("(~s", 3, "')' expected"),
        ("~s)", 2, "unexpected ')'"),
        ("~s |", 4, "expression expected"),
        ("& ~s", 0, "unexpected '&'"),
        ("!", 1, "expression expected"),
        ("~u 'open", 3, "unterminated quote"),
        ("~d ( ~s )", 3, "~d needs an argument"),
        ("~s | | ~q", 5, "unexpected '|'"),
    ],
)
def test_errors(expr: str, pos: int, message: str) -> None:
    with pytest.raises(FilterError) as info:
        parse(expr)
    assert info.value.pos == pos
    assert info.value.message == message
    assert f"column {pos + 1}" in str(info.value)


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    with pytest.raises(FilterError):
        parse("(" * 5000 + "~s" + ")" * 5000)
    with pytest.raises(FilterError):
        parse("!" * 5000 + "~s")
    assert parse("(" * 20 + "~s" + ")" * 20)(BY_ID[1])


_alphabet = st.sampled_from(list("~!&|()'\" \\abcdhqmtuspe0123456789.*[]?+-") + ["~websocket"])


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=40), st.lists(_alphabet, max_size=30).map("".join)))
def test_parser_never_crashes(expr: str) -> None:
    try:
        f = parse(expr)
    except FilterError:
        return
    for flow in FLOWS:
        assert f(flow) in (True, False)
