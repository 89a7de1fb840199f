"""The SQL filter compiler agrees with engine.filters (the Python predicates) on every flow."""

from __future__ import annotations

import gzip
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import filters, grpc
from engine.filters import FilterError
from engine.flow import (
    Body,
    Connection,
    Flow,
    FlowKind,
    FlowState,
    Request,
    Response,
    WebSocketMessage,
)
from engine.session_db import SessionDB
from engine.sqlfilter import compile_expr, required_literal, trigram_query

HOSTS = ["api.example.test", "cdn.Example.test:8443", "[::1]:8080", "hello.test", "é.test"]
PATHS = ["/", "/v1/items?id=42", "/search?q=needle", "/Hello/World", "/ünïcode/ſKK", "/x.json"]
WORDS = ["needle", "hello", "world", "json", "NEEDLE", "ünï", "ſ", "K", "x-trace", "true",
         "200", "get", "api", "é", "abc", "zzz", "[", "a.c", "^/v1", "wor(ld)?", "ne+dle",
         "\\d{2}", "json|html", "(?i)HELLO", "[a-c]{3}", "h.llo w", "x\\.json", "ld\\b", "ok$",
         "é.test", "needle.*true", "q=n", "50%_off", "a_b"]
TYPES = ["application/json", "text/html; charset=utf-8", "image/png", "text/plain", None]


def make_flow(rnd: random.Random) -> Flow:
    conn = Connection(id=rnd.randrange(1, 50), client=("10.0.0.2", rnd.randrange(1024, 60000)),
                      server=(rnd.choice(["1.2.3.4", "::1"]), rnd.choice([80, 443])),
                      sni=rnd.choice([None, "api.example.test", "SNI.test"]),
                      hostname=rnd.choice([None, "hello.test", "dns.test"]),
                      pid=rnd.choice([None, 7, 42]), command=rnd.choice([None, "curl -s x"]),
                      inbound=rnd.random() < 0.2)
    kind = rnd.choice([FlowKind.HTTP] * 6 + [FlowKind.WEBSOCKET, FlowKind.TCP, FlowKind.DNS])
    flow = Flow(conn=conn, kind=kind)
    flow.state = FlowState.DONE
    if kind in (FlowKind.TCP, FlowKind.DNS):
        flow.bytes_sent, flow.bytes_received = rnd.randrange(100), rnd.randrange(100)
        flow.error = rnd.choice([None, "reset"])
        flow.timings.done = flow.timings.start + 1
        return flow
    headers = [("Host", rnd.choice(HOSTS)), ("User-Agent", rnd.choice(["curl/8", "Python ü"]))]
    if rnd.random() < 0.3:
        headers.append(("X-Trace", rnd.choice(WORDS)))
    req_type = rnd.choice(TYPES)
    if req_type:
        headers.append(("Content-Type", req_type))
    body = Body.of(" ".join(rnd.choices(WORDS, k=rnd.randrange(0, 6))).encode())
    flow.request = Request(rnd.choice(["GET", "POST", "get", "PUT"]), rnd.choice(["http", "https"]),
                           rnd.choice(HOSTS), rnd.choice(PATHS), "HTTP/1.1", headers, body)
    if rnd.random() < 0.15:  # in progress: no response, no bodies yet
        flow.state = FlowState.REQUEST
        flow.request.body = Body(cap=0)
        return flow
    if rnd.random() < 0.1:
        flow.error = "upstream refused"
        flow.state = FlowState.ERROR
        flow.timings.done = flow.timings.start + 0.5
        return flow
    text = " ".join(rnd.choices(WORDS, k=rnd.randrange(0, 10))).encode()
    rheaders = [("Server", "test"), ("Content-Type", rnd.choice(TYPES) or "text/plain")]
    if rnd.random() < 0.3:
        rheaders.append(("Content-Encoding", "gzip"))
        text = gzip.compress(text)
    flow.response = Response(rnd.choice([200, 404, 500, 101]), "OK", "HTTP/1.1", rheaders,
                             Body.of(text))
    if rnd.random() < 0.2:  # gRPC: the status in the trailers, or in the headers alone
        rheaders[1] = ("Content-Type", rnd.choice(["application/grpc", "Application/GRPC+proto"]))
        status = ("grpc-status", rnd.choice(["0", "5", " 13", "x", ""]))
        where = rnd.choice([flow.response.trailers, rheaders, None])
        if where is not None:
            where.append(status)
    if kind is FlowKind.WEBSOCKET:
        flow.websocket_messages = [
            WebSocketMessage(rnd.random() < 0.5, 1, rnd.choice(WORDS).encode(), 1.0)
            for _ in range(rnd.randrange(3))]
    flow.timings.done = flow.timings.start + rnd.random()
    return flow


def store_flows(path: Path, flows: list[Flow], index_all: bool = False) -> list[int]:
    """Write flows; only part of them gets indexed (the rest stays pending)."""
    db = SessionDB(path)
    db.begin()
    ids = [db.write(f) for f in flows]
    db.index_pending(len(flows) if index_all else len(flows) * 2 // 3)
    db.commit()
    db.close()
    return ids


class Corpus:
    def __init__(self, path: Path, flows: list[Flow], index_all: bool = False) -> None:
        self.flows = flows
        self.ids = store_flows(path, flows, index_all)
        self.db = SessionDB(path)

    def sql(self, expr: str) -> list[int]:
        compiled = compile_expr(expr)
        return [r[0] for r in self.db.conn.execute(
            f"SELECT f.id FROM flows f WHERE {compiled.where} ORDER BY f.id", compiled.params)]

    def python(self, expr: str) -> list[int]:
        match = filters.parse(expr)
        return [i for i, f in zip(self.ids, self.flows, strict=True) if match(f)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Corpus]:
    rnd = random.Random(5)
    c = Corpus(tmp_path_factory.mktemp("sqlfilter") / "c.tapui",
               [make_flow(rnd) for _ in range(400)])
    yield c
    c.db.close()


def quote(word: str) -> str:
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


ARGS = st.sampled_from(WORDS) | st.text(st.sampled_from("aeiouxyzKſé.*^$[]()?+|\\ -/%_"),
                                        min_size=1, max_size=5)
REGEX_OPS = ["d", "u", "m", "h", "hq", "hs", "b", "bq", "bs", "t", "tq", "ts"]
ATOMS = st.one_of(
    st.builds(lambda op, a: f"~{op} {quote(a)}", st.sampled_from(REGEX_OPS), ARGS),
    st.builds(lambda c: f"~c {c}", st.sampled_from([200, 404, 101, 999])),
    st.builds(lambda p: f"~pid {p}", st.sampled_from([7, 42, 1])),
    st.sampled_from(["~s", "~q", "~e", "~websocket", "~tcp", "~udp", "~dns", "~http", "~all",
                     "~inbound"]),
    ARGS.map(quote),
)
EXPRS = st.recursive(ATOMS, lambda inner: st.one_of(
    inner.map(lambda e: f"!{e}"),
    st.builds(lambda a, b: f"({a} & {b})", inner, inner),
    st.builds(lambda a, b: f"({a} | {b})", inner, inner),
    st.builds(lambda a, b: f"{a} {b}", inner, inner),
), max_leaves=5)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(expr=EXPRS)
def test_sql_and_python_agree_on_a_corpus(corpus: Corpus, expr: str) -> None:
    assert corpus.sql(expr) == corpus.python(expr), expr


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), exprs=st.lists(EXPRS, min_size=5, max_size=5))
def test_sql_and_python_agree_on_generated_corpora(tmp_path_factory: pytest.TempPathFactory,
                                                   seed: int, exprs: list[str]) -> None:
    rnd = random.Random(seed)
    c = Corpus(tmp_path_factory.mktemp("gen") / "g.tapui",
               [make_flow(rnd) for _ in range(rnd.randrange(1, 40))], index_all=seed % 2 == 0)
    try:
        for expr in exprs:
            assert c.sql(expr) == c.python(expr), expr
    finally:
        c.db.close()


@pytest.mark.parametrize("expr", [
    "needle", "~d example", "~u v1/items", "~b hello", "!~c 200", "~h x-trace & ~s",
    "~d '^api\\.' | ~m post", "~t json", "~bs 'needle.*true'", "hello w", "(~q | ~e) !~tcp",
    "~websocket ~b world", "~d ::1", "é", "ſ", "~u ſkk", "~hq 'Python Ü'", "~inbound ~s",
])
def test_examples_agree(corpus: Corpus, expr: str) -> None:
    assert corpus.sql(expr) == corpus.python(expr)


def test_bad_expressions_raise_filter_error() -> None:
    for expr in ["~c x", "(a", "~nope 1", "~d"]:
        with pytest.raises(FilterError):
            compile_expr(expr)


def test_literal_extraction_for_the_trigram_index() -> None:
    p = filters.Pattern
    assert required_literal(p("needle"), raw=True) == "needle"
    assert required_literal(p("[unclosed"), raw=True) == "[unclosed"  # invalid: literal
    assert required_literal(p("ab+cdef?"), raw=False) == "cde"
    assert required_literal(p("foo|barbaz"), raw=False) is None
    assert required_literal(p("x(hello)y"), raw=True) == "hello"
    assert required_literal(p("é+abc"), raw=True) == "abc"
    assert trigram_query("ab") is None
    assert trigram_query('a"bc') == '"a""b" AND """bc"'


def test_index_narrows_the_search(corpus: Corpus) -> None:
    """A literal search reads the FTS index, not every row (the plan says so)."""
    compiled = compile_expr("needle")
    plan = " ".join(str(r) for r in corpus.db.conn.execute(
        f"EXPLAIN QUERY PLAN SELECT f.id FROM flows f WHERE {compiled.where}", compiled.params))
    assert "VIRTUAL TABLE INDEX" in plan and "search" in plan


def test_a_failed_rpc_is_an_error(corpus: Corpus) -> None:
    """~e also finds RPCs that failed with HTTP 200 (a non-zero grpc-status), in SQL too."""
    failed = [i for i, f in zip(corpus.ids, corpus.flows, strict=True)
              if f.error is None and grpc.failure(f.response)]
    ok = [i for i, f in zip(corpus.ids, corpus.flows, strict=True)
          if f.error is None and grpc.grpc_status(f.response) is not None
          and grpc.failure(f.response) is None]
    assert failed and ok
    found = set(corpus.sql("~e"))
    assert set(failed) <= found and not set(ok) & found
