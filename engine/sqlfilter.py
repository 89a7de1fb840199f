"""The filter language (engine.filters) compiled to SQL over a session file (engine.session_db).

Every operator becomes a SQL expression over `flows f` with the same meaning as the Python
predicate:

- ~d ~m ~t/~tq/~ts run their regex over the distinct interned values in `names` (a few
  thousand at most), then match by id through indexes; ~c ~pid ~s ~q ~e and the kinds are
  plain column tests; ~inbound reads the connection's details.
- ~u, ~h, ~b and plain text use the FTS5 trigram index when the pattern has a literal of three
  or more characters (the whole pattern, or the longest literal run a regex requires). The index
  only narrows the candidates; a registered function then checks each candidate exactly as
  engine.filters would, so results do not depend on tokenizer details. Without such a literal
  the check runs over every row (correct, slower).

Sessions index decoded bodies that are UTF-8; binary bodies are not searched (the in-memory
FlowStore searches their raw bytes too). Flows still in progress are matched on their URL and
headers only: their bodies are stored when they finish.
"""

from __future__ import annotations

import functools
import re
import sqlite3
from dataclasses import dataclass
from typing import Any

from engine.filters import And, Node, Not, Op, Or, Pattern, Text, parse_tree

try:  # the regex parser behind `re`; used only to find a literal a regex requires
    from re import _parser as _sre  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python < 3.11
    import sre_parse as _sre  # type: ignore[no-redef]

#: Trigrams at most in one index query (spread over the literal).
MAX_TRIGRAMS = 12
_OPEN = "('open', 'request', 'response')"
_KINDS = {
    "websocket": ("websocket",), "tcp": ("tcp",), "udp": ("udp",), "dns": ("dns",),
    "http": ("http", "websocket"),
}


#: An RPC that failed (engine.grpc.failure): an application/grpc* response whose grpc-status,
#: from its trailers or else its headers, is a number other than 0. The content type is
#: asked first (a names lookup), so the details of other flows are never parsed.
_GRPC_STATUS = ("(SELECT json_extract(x.value, '$[1]') FROM json_each(d.data, '$.rs[{i}]') x "
                "WHERE lower(json_extract(x.value, '$[0]')) = 'grpc-status' LIMIT 1)")
_GRPC_FAILED = (
    "(f.resp_ctype IN (SELECT id FROM names WHERE value LIKE 'application/grpc%') "
    "AND EXISTS (SELECT 1 FROM details d WHERE d.id = f.id AND (SELECT "
    "v != '' AND v NOT GLOB '*[^0-9]*' AND CAST(v AS INTEGER) != 0 FROM (SELECT trim(COALESCE("
    + _GRPC_STATUS.format(i=4) + ", " + _GRPC_STATUS.format(i=3) + ")) AS v))))"
)


@dataclass(frozen=True)
class SqlFilter:
    """A WHERE expression over `flows f` and its parameters."""

    where: str
    params: tuple[Any, ...]


def compile_expr(expr: str) -> SqlFilter:
    """Compile a filter expression; raises engine.filters.FilterError."""
    return compile_tree(parse_tree(expr.strip()))


def compile_tree(node: Node) -> SqlFilter:
    compiler = _Compiler()
    return SqlFilter(compiler.node(node), tuple(compiler.params))


# --- functions the SQL calls ----------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def pattern(source: str) -> Pattern:
    return Pattern(source)


def _regexp(source: str, value: str | None) -> int:
    """`value REGEXP source`: engine.filters' case-insensitive search (literal when invalid)."""
    return value is not None and pattern(source).text.search(value) is not None


def _grep(mode: str, source: str, head: str | None, hq: str | None, hs: str | None,
          bq: str | None, bs: str | None, ws: str | None) -> int:
    """The exact check of plain text (`text`), ~h/~hq/~hs and ~b/~bq/~bs on a texts row,
    written to match engine.filters._Searchable."""
    p = pattern(source)
    if mode == "text":
        data = ("\n".join([head or "", hq or "", hs or "", ""]).encode("utf-8", "surrogateescape")
                + b"\n".join(_bytes(x) for x in (bq, bs, ws)) + b"\n").lower()
        if p.literal is not None:
            return p.literal in data
        return p.raw.search(data) is not None
    if mode.startswith("h"):
        return (mode != "hs" and p.search(hq or "")) or (mode != "hq" and p.search(hs or ""))
    bodies = {"b": (bq, bs, ws), "bq": (bq,), "bs": (bs,)}[mode]
    for body in bodies:
        if not body:
            continue
        data = body.encode("utf-8").lower()
        if p.literal is not None:
            if p.literal in data:
                return True
        elif p.raw.search(data) is not None:
            return True
    return False


def _bytes(text: str | None) -> bytes:
    return text.encode("utf-8") if text else b""


def register(conn: sqlite3.Connection) -> None:
    """Register REGEXP and the exact-check function on a connection."""
    conn.create_function("regexp", 2, _regexp, deterministic=True)
    conn.create_function("tapui_grep", 8, _grep, deterministic=True)


# --- literals for the trigram index ---------------------------------------------------------


def required_literal(p: Pattern, raw: bool) -> str | None:
    """A string every match of `p` contains (case-insensitively), or None. `raw` picks the
    bytes regex (plain text, ~b) over the text one (~u, ~h)."""
    if p.literal is not None:
        return p.source
    source: str | bytes = p.raw.pattern if raw else p.text.pattern
    try:
        tree = _sre.parse(source)
    except Exception:  # noqa: BLE001 - any parser trouble: no literal, scan instead
        return None
    runs: list[list[int]] = []
    _runs(tree, runs)
    best = ""
    for run in runs:
        if raw:  # byte values: keep the pieces that are whole UTF-8 text
            pieces = bytes(run).decode("utf-8", "replace").split("\ufffd")
        else:
            pieces = ["".join(map(chr, run))]
        for piece in pieces:
            if len(piece) > len(best):
                best = piece
    return best or None


def _runs(items: Any, out: list[list[int]]) -> None:
    """Runs of consecutive literal characters that every match must contain."""
    current: list[int] = []
    for op, av in items:
        if op is _sre.LITERAL:
            current.append(av)
            continue
        if current:
            out.append(current)
            current = []
        if op is _sre.SUBPATTERN:
            _runs(av[-1], out)
        elif op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT, getattr(_sre, "POSSESSIVE_REPEAT", None)):
            low, _, sub = av
            if low >= 1:
                _runs(sub, out)
        elif op is getattr(_sre, "ATOMIC_GROUP", None):
            _runs(av, out)
    if current:
        out.append(current)


def trigram_query(literal: str | None) -> str | None:
    """An FTS5 query (AND of trigrams) every row containing `literal` matches."""
    if literal is None or len(literal) < 3 or "\x00" in literal:
        return None
    grams = [literal[i:i + 3] for i in range(len(literal) - 2)]
    if len(grams) > MAX_TRIGRAMS:
        step = (len(grams) - 1) / (MAX_TRIGRAMS - 1)
        grams = [grams[round(i * step)] for i in range(MAX_TRIGRAMS)]
    unique = list(dict.fromkeys(grams))
    return " AND ".join('"' + g.replace('"', '""') + '"' for g in unique)


# --- the compiler ---------------------------------------------------------------------------


class _Compiler:
    def __init__(self) -> None:
        self.params: list[Any] = []

    def param(self, value: Any) -> str:
        self.params.append(value)
        return "?"

    def node(self, node: Node) -> str:
        if isinstance(node, Not):
            return f"NOT {self.node(node.inner)}"
        if isinstance(node, And):
            return "(" + " AND ".join(self.node(t) for t in node.terms) + ")"
        if isinstance(node, Or):
            return "(" + " OR ".join(self.node(t) for t in node.terms) + ")"
        if isinstance(node, Text):
            return self.grep("text", node.value)
        return self.op(node)

    def named(self, column: str, source: str) -> str:
        """An interned column whose value matches; never NULL (NOT must stay two-valued)."""
        return (f"({column} IS NOT NULL AND {column} IN "
                f"(SELECT id FROM names WHERE value REGEXP {self.param(source)}))")

    def candidates(self, literal: str | None, raw: bool) -> str:
        """Rows that may contain `literal`: the index's hits, finished flows not indexed yet
        (narrowed by LIKE, which folds ASCII case only: a superset for bytes searches) and
        flows in progress (not indexed at all)."""
        query = trigram_query(literal)
        if query is None:
            return ""
        match = self.param(query)  # parameters go in the order they appear
        pending = "SELECT flow FROM pending"
        if raw and literal is not None:
            like = "%" + re.sub(r"([%_\\])", r"\\\1", literal) + "%"
            tests = " OR ".join(f"t.{c} LIKE {self.param(like)} ESCAPE '\\'"
                                for c in ("head", "hq", "hs", "bq", "bs", "ws"))
            pending = (f"SELECT p.flow FROM pending p CROSS JOIN texts t ON t.id = p.flow "
                       f"WHERE {tests}")  # CROSS: pending (short) drives the join
        return (f"f.id IN (SELECT rowid FROM search WHERE search MATCH {match} "
                f"UNION ALL {pending} "
                f"UNION ALL SELECT id FROM flows WHERE state IN {_OPEN}) AND ")

    def grep(self, mode: str, source: str) -> str:
        raw = mode == "text" or mode.startswith("b")
        prefix = self.candidates(required_literal(pattern(source), raw), raw)
        check = (f"(SELECT tapui_grep({self.param(mode)}, {self.param(source)}, t.head, t.hq, "
                 "t.hs, t.bq, t.bs, t.ws) FROM texts t WHERE t.id = f.id)")
        return f"({prefix}IFNULL({check}, 0))"

    def op(self, node: Op) -> str:
        name, arg = node.name, node.arg
        if name == "all":
            return "1"
        if name == "s":
            return "(f.status IS NOT NULL)"
        if name == "q":
            return "(f.method IS NOT NULL AND f.status IS NULL)"
        if name == "e":
            return f"(f.error IS NOT NULL OR {_GRPC_FAILED})"
        if name in _KINDS:
            return "(f.kind IN (" + ", ".join(f"'{k}'" for k in _KINDS[name]) + "))"
        if name == "inbound":  # (kept with the connection's details: rare, and no column)
            return ("(EXISTS (SELECT 1 FROM details d WHERE d.id = f.id "
                    "AND json_extract(d.data, '$.c.in')))")
        if name == "c":
            return f"(f.status IS {self.param(int(arg))})"  # type: ignore[arg-type]
        if name == "pid":
            return f"(f.pid IS {self.param(int(arg))})"  # type: ignore[arg-type]
        source = str(arg)
        if name == "d":
            cols = ("f.hostkey", "f.sni", "f.hostname")
            return "(" + " OR ".join(self.named(c, source) for c in cols) + ")"
        if name == "m":
            return self.named("f.method", source)
        if name in ("t", "tq", "ts"):
            cols = {"t": ("f.req_ctype", "f.resp_ctype"), "tq": ("f.req_ctype",),
                    "ts": ("f.resp_ctype",)}[name]
            return "(" + " OR ".join(self.named(c, source) for c in cols) + ")"
        if name == "u":
            literal = required_literal(pattern(source), raw=False)
            return (f"({self.candidates(literal, raw=False)}f.url IS NOT NULL "
                    f"AND f.url REGEXP {self.param(source)})")
        if name in ("h", "hq", "hs", "b", "bq", "bs"):
            return self.grep(name, source)
        raise ValueError(f"no SQL for ~{name}")  # the parser accepts no other operator

