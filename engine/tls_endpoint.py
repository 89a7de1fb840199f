"""One end of a TLS connection run over memory buffers.

The relay owns the sockets; a TlsEndpoint only turns wire bytes into plaintext and back. Both
legs use it: the app's (tapui is the server, with a leaf from its CA) and the upstream's (tapui
is the client). Doing the upstream leg this way rather than with asyncio's `start_tls` saves
about 0.4 ms per connection, and lets a whole batch of records be decrypted and re-encrypted
in one call each instead of one event-loop callback per 16 KiB record.
"""

from __future__ import annotations

import ssl

#: Plaintext asked for per SSLObject.read call (it returns at most one record's worth).
READ_SIZE = 256 * 1024


class TlsEndpoint:
    __slots__ = ("ssl_object", "_incoming", "_outgoing", "handshake_done", "closed", "failed")

    def __init__(
        self,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
    ) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.ssl_object = context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side,
            server_hostname=server_hostname,
        )
        self.handshake_done = False
        self.closed = False  # the peer sent close_notify
        #: An error met after records that `read` returned: raised by the next `read`.
        self.failed: ssl.SSLError | None = None

    def feed(self, data: bytes) -> None:
        """Bytes that came from the peer."""
        if data:
            self._incoming.write(data)

    def handshake(self) -> bool:
        """Advance the handshake with what was fed; True once it is complete.

        Raises ssl.SSLError (ssl.SSLCertVerificationError when the peer's certificate fails).
        """
        if not self.handshake_done:
            try:
                self.ssl_object.do_handshake()
            except ssl.SSLWantReadError:
                return False
            self.handshake_done = True
        return True

    def read(self) -> list[bytes]:
        """The plaintext in what was fed, as it was decrypted (a record's worth a piece; [] if
        none); sets `closed` at close_notify. The pieces are not joined: whoever takes them
        writes them on one by one, and joining would copy every byte once more.

        Raises ssl.SSLError for a bad record (or an alert). When records came before it, they
        are returned first and the error is kept in `failed` (the next call raises it): what
        the peer sent before its alert, say an HTTP/2 server's trailers, is still passed on.
        """
        if self.failed is not None:
            raise self.failed
        chunks: list[bytes] = []
        read = self.ssl_object.read
        try:
            while True:
                chunk = read(READ_SIZE)
                if not chunk:  # the peer's close_notify (with no data left, it raises)
                    self.closed = True
                    break
                chunks.append(chunk)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            self.closed = True
        except ssl.SSLError as exc:
            if not chunks:
                raise
            self.failed = exc
        return chunks

    def write(self, data: bytes | memoryview) -> None:
        """Plaintext to send to the peer (take the records with `output`)."""
        self.ssl_object.write(data)

    def close(self) -> None:
        """Queue a close_notify for the peer (take it with `output`)."""
        try:
            self.ssl_object.unwrap()
        except ssl.SSLError:
            pass  # the peer's close_notify has not come yet: ours is queued all the same

    def output(self) -> bytes:
        """The bytes to send to the peer now (b"" if none)."""
        out = self._outgoing
        return out.read() if out.pending else b""
