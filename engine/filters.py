"""Flow filter expressions, after mitmproxy's flowfilter.

    ~d REGEX   host            ~u REGEX   URL             ~m REGEX   method
    ~c CODE    status code     ~h/~hq/~hs REGEX  headers (both / request / response)
    ~b/~bq/~bs REGEX  decoded bodies   ~t/~tq/~ts REGEX  content type
    ~s  has a response         ~q  request without response
    ~e  error (of the connection or the exchange, or an RPC's non-zero grpc-status)
    ~websocket ~tcp ~udp ~dns ~http   flow kind       ~pid N   process id
    ~inbound   from the host to a published port (--publish)
    ~all       every flow
    !x  not      x & y  and      x | y  or      (x)  grouping     x y  implicit and
    text       plain text: case-insensitive regex over URL, headers and decoded bodies

Arguments may be quoted ('...' or "..." with backslash escapes). A regex that does not compile is
taken as a literal substring, so half-typed patterns still filter sensibly.
"""

from __future__ import annotations

import functools
import re
import threading
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import AnyStr

from engine import grpc
from engine.content import ContentDecodeError, decode_body
from engine.flow import (
    Body,
    ConnectionSummary,
    EventKind,
    Flow,
    FlowEvent,
    FlowKind,
    FlowListener,
    Headers,
    header,
)

#: Raw body bytes read for body matching; larger bodies are searched in their first bytes only.
BODY_SEARCH_LIMIT = 1024 * 1024

#: Memory kept at most for the searchable text of finished flows.
SEARCH_CACHE_BUDGET = 256 * 1024 * 1024
#: Deepest nesting of parentheses and negations accepted.
MAX_DEPTH = 64

Filter = Callable[[Flow], bool]


class FilterError(ValueError):
    """A filter expression that does not parse; `pos` is the offending character offset."""

    def __init__(self, message: str, pos: int) -> None:
        super().__init__(f"{message} (at column {pos + 1})")
        self.message = message
        self.pos = pos


# --- matching helpers -------------------------------------------------------------------------


_REGEX_SYNTAX = set(".^$*+?{}[]\\|()")


def _compile(pattern: AnyStr) -> re.Pattern[AnyStr]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FutureWarnings about odd character sets
        try:
            return re.compile(pattern, re.IGNORECASE)
        except (re.error, RecursionError, OverflowError):
            return re.compile(re.escape(pattern), re.IGNORECASE)


class _Pattern:
    """A case-insensitive regex compiled for both text and bytes, literal when invalid."""

    __slots__ = ("source", "text", "raw", "literal")

    def __init__(self, source: str) -> None:
        self.source = source
        self.text = _compile(source)
        encoded = source.encode("utf-8", "surrogatepass")
        self.raw = _compile(encoded)
        # A pattern without regex syntax is searched with bytes.find in lower-cased text.
        plain = not any(ch in _REGEX_SYNTAX for ch in source)
        self.literal = encoded.lower() if plain or self.raw.pattern != encoded else None

    def search(self, value: str | None) -> bool:
        return value is not None and self.text.search(value) is not None


def _header_text(headers: Headers) -> str:
    return "\n".join(f"{k}: {v}" for k, v in headers)


def body_bytes(body: Body, headers: Headers, limit: int | None = None) -> bytes:
    """The body decoded from its Content-Encoding (raw bytes when decoding fails)."""
    if not body.size:
        return b""
    if limit is None:
        limit = BODY_SEARCH_LIMIT
    raw = body.read(limit)
    encoding = header(headers, "content-encoding")
    if not encoding or encoding.strip().lower() == "identity":
        return raw
    try:
        return decode_body(raw, encoding, max_size=limit * 8, partial=True)
    except ContentDecodeError:
        return raw


class _Searchable:
    """A flow's URL, headers and decoded bodies as one lower-cased bytes blob (every search is
    case-insensitive), with the offsets of each body, so plain text is a single search."""

    __slots__ = ("ref", "hq", "hs", "data", "bq", "bs", "ws", "size")

    def __init__(self, flow: Flow) -> None:
        self.ref: weakref.ref[Flow] | None = None
        request, response = flow.request, flow.response
        head = [request.url, request.method] if request is not None else [flow.host]
        self.hq = _header_text(request.headers) if request is not None else ""
        self.hs = _header_text(response.headers) if response is not None else ""
        head += [self.hq, self.hs, ""]
        data = bytearray("\n".join(head).encode("utf-8", "surrogateescape"))
        self.bq = self._add(data, body_bytes(request.body, request.headers) if request else b"")
        self.bs = self._add(data, body_bytes(response.body, response.headers)
                            if response else b"")
        self.ws = self._add(data, b"\n".join(m.content for m in flow.websocket_messages))
        self.data = bytes(data).lower()
        self.size = len(self.data) + len(self.hq) + len(self.hs) + 200

    @staticmethod
    def _add(data: bytearray, chunk: bytes) -> tuple[int, int]:
        start = len(data)
        data += chunk
        data += b"\n"
        return start, start + len(chunk)

    def search_body(self, p: _Pattern, span: tuple[int, int]) -> bool:
        start, end = span
        if start == end:
            return False
        if p.literal is not None:
            return self.data.find(p.literal, start, end) >= 0
        with memoryview(self.data) as view:
            return p.raw.search(view[start:end]) is not None


class _SearchCache:
    """Searchables of finished flows (they no longer change), up to a memory budget; flows
    still in progress are rebuilt on every search. Entries go when their flow is freed."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.size = 0
        self._entries: dict[int, _Searchable] = {}
        self._lock = threading.RLock()

    def get(self, flow: Flow) -> _Searchable:
        key = id(flow)
        entry = self._entries.get(key)
        if entry is not None and entry.ref is not None and entry.ref() is flow:
            return entry
        entry = _Searchable(flow)
        if flow.finished and self.size + entry.size <= self.budget:
            with self._lock:
                entry.ref = weakref.ref(flow, functools.partial(self._forget, key))
                old = self._entries.get(key)
                if old is not None:
                    self.size -= old.size
                self._entries[key] = entry
                self.size += entry.size
        return entry

    def _forget(self, key: int, ref: weakref.ref[Flow]) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.ref is ref:
                del self._entries[key]
                self.size -= entry.size


_cache = _SearchCache(SEARCH_CACHE_BUDGET)


def prime(flow: Flow) -> None:
    """Prepare a finished flow for text search now (spreads the cost over a live session
    instead of paying it all on the first text filter)."""
    if flow.finished:
        _cache.get(flow)


# --- filter constructors ----------------------------------------------------------------------

def _host(p: _Pattern) -> Filter:
    search = p.text.search

    def f(flow: Flow) -> bool:
        request, conn = flow.request, flow.conn
        if request is not None:
            if search(request.authority) is not None:
                return True
        elif search(flow.host) is not None:
            return True
        sni, name = conn.sni, conn.hostname
        return (sni is not None and search(sni) is not None) or (
            name is not None and name != sni and search(name) is not None)

    return f


def _url(p: _Pattern) -> Filter:
    search = p.text.search
    return lambda flow: flow.request is not None and search(flow.request.url) is not None


def _method(p: _Pattern) -> Filter:
    search = p.text.search
    return lambda flow: flow.request is not None and search(flow.request.method) is not None


def _code(code: int) -> Filter:
    return lambda flow: flow.response is not None and flow.response.status == code


def _pid(pid: int) -> Filter:
    return lambda flow: flow.conn.pid == pid


def _headers(p: _Pattern, request: bool, response: bool) -> Filter:
    def f(flow: Flow) -> bool:
        s = _cache.get(flow)
        return (request and p.search(s.hq)) or (response and p.search(s.hs))

    return f


def _bodies(p: _Pattern, request: bool, response: bool, websocket: bool) -> Filter:
    def f(flow: Flow) -> bool:
        s = _cache.get(flow)
        return ((request and s.search_body(p, s.bq)) or (response and s.search_body(p, s.bs))
                or (websocket and s.search_body(p, s.ws)))

    return f


def _content_type(p: _Pattern, request: bool, response: bool) -> Filter:
    def f(flow: Flow) -> bool:
        req, resp = flow.request, flow.response
        return ((request and req is not None and p.search(header(req.headers, "content-type")))
                or (response and resp is not None
                    and p.search(header(resp.headers, "content-type"))))

    return f


def _text(p: _Pattern) -> Filter:
    """Plain text: URL (or host of raw flows), method, headers, decoded bodies, WebSocket
    messages, searched as one UTF-8 blob (so case is ignored for ASCII letters only)."""
    get = _cache.get
    literal = p.literal
    if literal is not None:
        return lambda flow: literal in get(flow).data
    search = p.raw.search
    return lambda flow: search(get(flow).data) is not None


def _and(a: Filter, b: Filter) -> Filter:
    return lambda flow: a(flow) and b(flow)


def _or(a: Filter, b: Filter) -> Filter:
    return lambda flow: a(flow) or b(flow)


def _kind(*kinds: FlowKind) -> Filter:
    return lambda flow: flow.kind in kinds


_NO_ARG: dict[str, Filter] = {
    "s": lambda flow: flow.response is not None,
    "q": lambda flow: flow.request is not None and flow.response is None,
    "e": lambda flow: flow.error is not None or grpc.failure(flow.response) is not None,
    "websocket": _kind(FlowKind.WEBSOCKET),
    "tcp": _kind(FlowKind.TCP),
    "udp": _kind(FlowKind.UDP),
    "dns": _kind(FlowKind.DNS),
    "http": _kind(FlowKind.HTTP, FlowKind.WEBSOCKET),
    "inbound": lambda flow: flow.conn.inbound,
    "all": lambda flow: True,
}

_REGEX_ARG: dict[str, Callable[[_Pattern], Filter]] = {
    "d": _host,
    "u": _url,
    "m": _method,
    "h": lambda p: _headers(p, True, True),
    "hq": lambda p: _headers(p, True, False),
    "hs": lambda p: _headers(p, False, True),
    "b": lambda p: _bodies(p, True, True, websocket=True),
    "bq": lambda p: _bodies(p, True, False, websocket=False),
    "bs": lambda p: _bodies(p, False, True, websocket=False),
    "t": lambda p: _content_type(p, True, True),
    "tq": lambda p: _content_type(p, True, False),
    "ts": lambda p: _content_type(p, False, True),
}

_INT_ARG: dict[str, Callable[[int], Filter]] = {"c": _code, "pid": _pid}

#: Every operator name, for help texts and completion.
OPERATORS = sorted([*_NO_ARG, *_REGEX_ARG, *_INT_ARG])


# --- tokenizer and parser ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # "op" (~name), "word", "(", ")", "!", "&", "|"
    value: str
    pos: int


_PUNCT = "()!&|"


def _read_quoted(expr: str, i: int) -> tuple[str, int]:
    quote = expr[i]
    out: list[str] = []
    j = i + 1
    while j < len(expr):
        ch = expr[j]
        if ch == "\\" and j + 1 < len(expr):
            nxt = expr[j + 1]
            # \" and \\ unescape; other escapes stay as written (they are regex escapes).
            out.append(nxt if nxt in (quote, "\\") else ch + nxt)
            j += 2
            continue
        if ch == quote:
            return "".join(out), j + 1
        out.append(ch)
        j += 1
    raise FilterError("unterminated quote", i)


def _tokenize(expr: str) -> list[_Token]:
    tokens: list[_Token] = []
    i = 0
    n = len(expr)
    while i < n:
        ch = expr[i]
        if ch.isspace():
            i += 1
        elif ch in _PUNCT:
            tokens.append(_Token(ch, ch, i))
            i += 1
        elif ch in "'\"":
            value, end = _read_quoted(expr, i)
            tokens.append(_Token("word", value, i))
            i = end
        else:
            start = i
            while i < n and not expr[i].isspace() and expr[i] not in _PUNCT:
                i += 1
            word = expr[start:i]
            if word.startswith("~") and len(word) > 1:
                tokens.append(_Token("op", word[1:], start))
            else:
                tokens.append(_Token("word", word, start))
    return tokens


# --- syntax tree ------------------------------------------------------------------------------
#
# `parse_tree` gives the parsed expression as data, for other back ends (engine.sqlfilter
# compiles it to SQL); `parse` builds Python predicates from the same tree.


@dataclass(frozen=True, slots=True)
class Op:
    """`~name [arg]`; arg is None, a regex source (str) or a number (int)."""

    name: str
    arg: str | int | None = None


@dataclass(frozen=True, slots=True)
class Text:
    """Plain text: a case-insensitive regex (or literal) over URL, headers and bodies."""

    value: str


@dataclass(frozen=True, slots=True)
class Not:
    inner: Node


@dataclass(frozen=True, slots=True)
class And:
    terms: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Or:
    terms: tuple[Node, ...]


Node = Op | Text | Not | And | Or

#: The public name of the pattern type used by every regex argument.
Pattern = _Pattern


def build(node: Node) -> Filter:
    """A Python predicate for a syntax tree."""
    if isinstance(node, Text):
        return _text(_Pattern(node.value))
    if isinstance(node, Not):
        inner = build(node.inner)
        return lambda flow: not inner(flow)
    if isinstance(node, And):
        return functools.reduce(_and, [build(t) for t in node.terms])
    if isinstance(node, Or):
        return functools.reduce(_or, [build(t) for t in node.terms])
    if node.name in _NO_ARG:
        return _NO_ARG[node.name]
    if node.name in _INT_ARG:
        return _INT_ARG[node.name](int(node.arg))  # type: ignore[arg-type]
    return _REGEX_ARG[node.name](_Pattern(str(node.arg)))


class _Parser:
    """Recursive descent: or := and ('|' and)*; and := not ('&'? not)*; not := '!' not | atom."""

    def __init__(self, expr: str) -> None:
        self.expr = expr
        self.tokens = _tokenize(expr)
        self.i = 0
        self.depth = 0

    def nest(self, pos: int) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise FilterError("expression nested too deeply", pos)

    def peek(self) -> _Token | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> _Token:
        token = self.tokens[self.i]
        self.i += 1
        return token

    def end_pos(self) -> int:
        return len(self.expr)

    def parse(self) -> Node:
        if not self.tokens:
            return Op("all")
        result = self.parse_or()
        token = self.peek()
        if token is not None:
            raise FilterError(f"unexpected {token.value!r}", token.pos)
        return result

    def parse_or(self) -> Node:
        terms = [self.parse_and()]
        while (token := self.peek()) is not None and token.kind == "|":
            self.take()
            terms.append(self.parse_and())
        return terms[0] if len(terms) == 1 else Or(tuple(terms))

    def parse_and(self) -> Node:
        terms = [self.parse_not()]
        while (token := self.peek()) is not None and token.kind not in ("|", ")"):
            if token.kind == "&":
                self.take()
            terms.append(self.parse_not())
        return terms[0] if len(terms) == 1 else And(tuple(terms))

    def parse_not(self) -> Node:
        token = self.peek()
        if token is not None and token.kind == "!":
            self.take()
            self.nest(token.pos)
            inner = self.parse_not()
            self.depth -= 1
            return Not(inner)
        return self.parse_atom()

    def parse_atom(self) -> Node:
        token = self.peek()
        if token is None:
            raise FilterError("expression expected", self.end_pos())
        self.take()
        if token.kind == "(":
            self.nest(token.pos)
            inner = self.parse_or()
            self.depth -= 1
            close = self.peek()
            if close is None or close.kind != ")":
                pos = close.pos if close is not None else self.end_pos()
                raise FilterError("')' expected", pos)
            self.take()
            return inner
        if token.kind == "word":
            return Text(token.value)
        if token.kind == "op":
            return self.parse_op(token)
        raise FilterError(f"unexpected {token.value!r}", token.pos)

    def parse_op(self, token: _Token) -> Node:
        name = token.value
        if name in _NO_ARG:
            return Op(name)
        if name not in _REGEX_ARG and name not in _INT_ARG:
            raise FilterError(f"unknown filter ~{name}", token.pos)
        arg = self.peek()
        if arg is None or arg.kind != "word":
            pos = arg.pos if arg is not None else self.end_pos()
            raise FilterError(f"~{name} needs an argument", pos)
        self.take()
        if name in _INT_ARG:
            try:
                number = int(arg.value, 10)
            except ValueError:
                raise FilterError(f"~{name} needs a number", arg.pos) from None
            return Op(name, number)
        return Op(name, arg.value)


def parse_tree(expr: str) -> Node:
    """The syntax tree of a filter expression (`Op("all")` when empty); raises FilterError."""
    return _Parser(expr).parse()


def parse(expr: str) -> Filter:
    """Compile a filter expression; an empty expression matches every flow."""
    return build(parse_tree(expr))


@dataclass(frozen=True)
class SearchTerms:
    """The patterns of a filter that look for text, by the part of a flow they look in: what a
    view of the flow can mark. Terms under a `!` look for what is absent, so none is taken."""

    request_head: tuple[re.Pattern[str], ...] = ()
    request_body: tuple[re.Pattern[str], ...] = ()
    response_head: tuple[re.Pattern[str], ...] = ()
    response_body: tuple[re.Pattern[str], ...] = ()


#: Which parts (request head, request body, response head, response body) each text-searching
#: operator looks in; a URL is part of the request head.
_TERM_PARTS: dict[str, tuple[bool, bool, bool, bool]] = {
    "u": (True, False, False, False),
    "h": (True, False, True, False),
    "hq": (True, False, False, False),
    "hs": (False, False, True, False),
    "b": (False, True, False, True),
    "bq": (False, True, False, False),
    "bs": (False, False, False, True),
}


def search_terms(expr: str) -> SearchTerms:
    """The text patterns of a filter expression (none when it does not parse)."""
    try:
        tree = parse_tree(expr.strip())
    except FilterError:
        return SearchTerms()
    parts: tuple[list[re.Pattern[str]], ...] = ([], [], [], [])

    def walk(node: Node) -> None:
        if isinstance(node, And | Or):
            for term in node.terms:
                walk(term)
        elif isinstance(node, Text):
            for part in parts:
                part.append(_compile(node.value))
        elif isinstance(node, Op) and node.name in _TERM_PARTS and node.arg:
            for part, wanted in zip(parts, _TERM_PARTS[node.name], strict=True):
                if wanted:
                    part.append(_compile(str(node.arg)))

    walk(tree)
    return SearchTerms(*(tuple(part) for part in parts))


class OutputFilter:
    """`--filter`: what the run's outputs (its lines, the HAR, the JSON lines) keep: finished
    flows the expression matches, and closed connections it matches as raw TCP flows (`~tcp`,
    `~d host`, ...)."""

    def __init__(self, expr: str) -> None:
        self.expr = expr
        self.matches = parse(expr)  # raises FilterError

    def events(self, listener: FlowListener) -> FlowListener:
        """`listener`, given only the DONE events of matching flows."""

        def only_matching(event: FlowEvent) -> None:
            if event.kind is EventKind.DONE and self.matches(event.flow):
                listener(event)

        return only_matching

    def connections(self, listener: Callable[[ConnectionSummary], None]
                    ) -> Callable[[ConnectionSummary], None]:
        """`listener`, given only the closed connections that match as raw flows."""

        def only_matching(summary: ConnectionSummary) -> None:
            flow = Flow(conn=summary.info, kind=FlowKind(summary.info.transport), id=0)
            flow.bytes_sent, flow.bytes_received = summary.sent, summary.received
            flow.error = summary.error
            if self.matches(flow):
                listener(summary)

        return only_matching
