"""urllib3's view of a bank's TLS context: one handshake per pooled connection.

:class:`BankSslContext` hands our pyOpenSSL context to urllib3 (which otherwise
builds its own) and adds what urllib3's pyOpenSSL wrapper lacks:

* the server's host name (or IP) is checked by OpenSSL during the handshake, so
  a mismatch is reported as such (``X509_V_ERR_HOSTNAME_MISMATCH``) instead of a
  late generic error;
* TLS session resumption: the last session with each server is offered on the
  next connection, so a new connection need not cost a token signature;
* counters of full and resumed handshakes (a full handshake = one signature
  with the token key), for tests, metrics and the health report;
* a handshake failure keeps OpenSSL's reasons and verify result, which
  ``client.py`` turns into one of the errors of ``errors.py``;
* every read and write tells ``exchange.py`` which socket the request under way
  uses (so its deadline can cut it) and when the request has gone out whole.

:class:`BankConnectionPool` is urllib3's pool with idle limits: a connection that
has sat unused longer than the bank allows (its ``Keep-Alive: timeout=N``, less a
margin, or the bank's ``idle_timeout``) is closed instead of reused, since the bank
may close it just as the next request is written to it. Its connections refuse an
answer whose head the bank cut short (http.client would take the header lines up
to the end of the connection for a whole head).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import http.client
import ipaddress
import math
import socket
import ssl
import threading
import time
from typing import Any

from OpenSSL import SSL
from urllib3.connection import HTTPSConnection
from urllib3.connectionpool import HTTPSConnectionPool
from urllib3.contrib.pyopenssl import PyOpenSSLContext, WrappedSocket
from urllib3.util import wait_for_read

from agent.transport import exchange
from agent.transport.tls import TlsContext, pointer
from pkcs11_backends.openssl import libcrypto, libssl

_X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS = 0x4


@functools.cache
def _ssl_lib() -> ctypes.CDLL:
    lib = libssl()
    lib.SSL_get0_param.restype = ctypes.c_void_p
    lib.SSL_get0_param.argtypes = [ctypes.c_void_p]
    lib.SSL_get_verify_result.restype = ctypes.c_long
    lib.SSL_get_verify_result.argtypes = [ctypes.c_void_p]
    lib.SSL_session_reused.restype = ctypes.c_int
    lib.SSL_session_reused.argtypes = [ctypes.c_void_p]
    return lib


@functools.cache
def _crypto_lib() -> ctypes.CDLL:
    lib = libcrypto()
    lib.X509_VERIFY_PARAM_set1_host.restype = ctypes.c_int
    lib.X509_VERIFY_PARAM_set1_host.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    lib.X509_VERIFY_PARAM_set1_ip_asc.restype = ctypes.c_int
    lib.X509_VERIFY_PARAM_set1_ip_asc.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.X509_VERIFY_PARAM_set_hostflags.restype = None
    lib.X509_VERIFY_PARAM_set_hostflags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    lib.X509_verify_cert_error_string.restype = ctypes.c_char_p
    lib.X509_verify_cert_error_string.argtypes = [ctypes.c_long]
    return lib


X509_V_OK = 0
X509_V_ERR_HOSTNAME_MISMATCH = 62
X509_V_ERR_IP_ADDRESS_MISMATCH = 64


class HandshakeError(ssl.SSLError):
    """A failed handshake with what OpenSSL knew about it."""

    def __init__(self, error: SSL.Error, verify_code: int, verify_message: str) -> None:
        self.reasons = [str(part[2]) for part in error.args[0]] if error.args and isinstance(error.args[0], list) \
            else [str(error)]
        self.verify_code = verify_code
        self.verify_message = verify_message
        super().__init__(f"bad handshake: {'; '.join(self.reasons)}"
                         + (f" (certificate verify: {verify_message})" if verify_code != X509_V_OK else ""))


@dataclasses.dataclass
class HandshakeStats:
    full: int = 0
    resumed: int = 0

    @property
    def total(self) -> int:
        return self.full + self.resumed


class _SessionSavingSocket(WrappedSocket):
    """Keeps the newest session (TLS 1.3 tickets arrive after the handshake) when urllib3 closes it."""

    def __init__(self, connection: SSL.Connection, sock: socket.socket, on_close: Any) -> None:
        super().__init__(connection, sock)
        self._on_close = on_close

    def recv(self, *args: Any, **kwargs: Any) -> bytes:
        self._reading()
        return super().recv(*args, **kwargs)

    def recv_into(self, *args: Any, **kwargs: Any) -> int:
        self._reading()
        return super().recv_into(*args, **kwargs)

    def sendall(self, data: bytes) -> None:
        exchange.use_socket(self.socket)
        try:
            super().sendall(data)
        except BaseException:
            current = exchange.current()
            if current is not None:
                current.send_failed = True
            raise

    def _reading(self) -> None:
        # http.client reads only once the whole request is out.
        exchange.use_socket(self.socket)
        current = exchange.current()
        if current is not None:
            current.reading = True

    def close(self) -> None:
        # urllib3 drops connections without a close_notify, and OpenSSL then marks
        # their session as not resumable; a clean end of ours is a clean end.
        self.connection.set_shutdown(SSL.SENT_SHUTDOWN)
        self._on_close(self.connection)
        super().close()


class BankSslContext(PyOpenSSLContext):
    """A urllib3 ``ssl_context`` carrying one bank's :class:`TlsContext`."""

    def __init__(self, tls: TlsContext) -> None:
        super().__init__(ssl.PROTOCOL_TLS_CLIENT)
        self._ctx = tls.context
        self.tls = tls
        self.stats = HandshakeStats()
        self._sessions: dict[str, SSL.Session] = {}
        self._lock = threading.Lock()

    # urllib3 sets verify_mode on every connection; ours is fixed: verify the server, always.
    @property
    def verify_mode(self) -> int:
        return ssl.CERT_REQUIRED

    @verify_mode.setter
    def verify_mode(self, value: ssl.VerifyMode) -> None:
        if value != ssl.CERT_REQUIRED:
            raise ValueError("bank connections always verify the server certificate")

    def wrap_socket(self, sock: socket.socket, server_side: bool = False, do_handshake_on_connect: bool = True,
                    suppress_ragged_eofs: bool = True, server_hostname: bytes | str | None = None) -> WrappedSocket:
        if isinstance(server_hostname, bytes):
            server_hostname = server_hostname.decode("ascii")
        if not server_hostname:
            raise ssl.SSLError("a bank connection needs the server's host name to verify it")
        exchange.use_socket(sock)
        connection = SSL.Connection(self._ctx, sock)
        ssl_ptr = pointer(connection._ssl)
        if self._expect_host(ssl_ptr, server_hostname):
            connection.set_tlsext_host_name(server_hostname.encode("idna"))
        session_key = f"{server_hostname}|{sock.getpeername()!r}"
        with self._lock:
            session = self._sessions.get(session_key)
        if session is not None:
            connection.set_session(session)
        connection.set_connect_state()
        while True:
            try:
                connection.do_handshake()
            except SSL.WantReadError as exc:
                if not wait_for_read(sock, sock.gettimeout()):
                    raise TimeoutError("TLS handshake timed out") from exc
                continue
            except SSL.Error as exc:
                code = int(_ssl_lib().SSL_get_verify_result(ssl_ptr))
                message = (_crypto_lib().X509_verify_cert_error_string(code) or b"").decode("ascii", "replace")
                raise HandshakeError(exc, code, message) from exc
            break
        resumed = bool(_ssl_lib().SSL_session_reused(ssl_ptr))
        with self._lock:
            if resumed:
                self.stats.resumed += 1
            else:
                self.stats.full += 1

        def save(conn: SSL.Connection) -> None:
            saved = conn.get_session()
            if saved is not None:
                with self._lock:
                    self._sessions[session_key] = saved

        save(connection)
        return _SessionSavingSocket(connection, sock, save)

    @staticmethod
    def _expect_host(ssl_ptr: int, host: str) -> bool:
        """Make OpenSSL check the server's name; True if it is a DNS name (to be sent as SNI)."""
        param = _ssl_lib().SSL_get0_param(ssl_ptr)
        crypto = _crypto_lib()
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            ip = None
        if ip is None:
            crypto.X509_VERIFY_PARAM_set_hostflags(param, _X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS)
            ok = crypto.X509_VERIFY_PARAM_set1_host(param, host.encode("idna"), 0)
        else:
            ok = crypto.X509_VERIFY_PARAM_set1_ip_asc(param, str(ip).encode("ascii"))
        if ok != 1:
            raise ssl.SSLError(f"cannot set the expected server name {host!r}")
        return ip is None


# A bank's Keep-Alive timeout is its own clock: stop reusing a connection this much before it runs out.
KEEP_ALIVE_MARGIN = 1.0


def idle_limit(keep_alive: str | None, default: float) -> float:
    """How long a connection may sit idle: ``default``, or less when ``Keep-Alive: timeout=N`` says so."""
    for part in (keep_alive or "").split(","):
        name, _, value = part.strip().partition("=")
        if name.strip().lower() == "timeout":
            try:
                seconds = float(value.strip().strip('"'))
            except ValueError:
                return default
            if not math.isfinite(seconds) or seconds < 0:  # ignore a header that makes no sense
                return default
            # Never the bank's full timeout, and with a short one at least half of it.
            return min(default, max(seconds - KEEP_ALIVE_MARGIN, seconds / 2))
    return default


class TruncatedHeadError(http.client.HTTPException):
    """The connection ended before the blank line that ends an answer's head."""


class _HeadReader:
    """The answer's stream while http.client reads its head: notes whether it ended before the blank line."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.cut = False

    def readline(self, limit: int = -1) -> bytes:
        line: bytes = self.raw.readline(limit)
        self.cut = not line
        return line

    def __getattr__(self, name: str) -> Any:  # read, close, flush…: the stream's own
        return getattr(self.raw, name)


class _WholeHeadResponse(http.client.HTTPResponse):
    def begin(self) -> None:
        head = self.fp = _HeadReader(self.fp)  # type: ignore[assignment]
        try:
            super().begin()
        finally:
            if isinstance(self.fp, _HeadReader):  # not closed by http.client meanwhile
                self.fp = head.raw
        if head.cut:
            self.close()
            raise TruncatedHeadError("the bank closed the connection in the middle of its answer's head")


class BankConnection(HTTPSConnection):
    """urllib3's connection, with how long it may stay idle in the pool and since when it is."""

    response_class = _WholeHeadResponse
    idle_limit: float = 0.0
    idle_since: float | None = None  # time.monotonic() when it went back to the pool


class BankConnectionPool(HTTPSConnectionPool):
    """Reuses a connection only within its idle limit; tells the exchange whether it got a used one."""

    ConnectionCls = BankConnection

    def _get_conn(self, timeout: float | None = None) -> Any:
        conn = super()._get_conn(timeout)
        if isinstance(conn, BankConnection) and conn.idle_since is not None and not conn.is_closed \
                and time.monotonic() - conn.idle_since > conn.idle_limit:
            conn.close()  # urllib3 connects it afresh on the request
        current = exchange.current()
        if current is not None:
            current.reused = not conn.is_closed
        return conn

    def _put_conn(self, conn: Any) -> None:
        if isinstance(conn, BankConnection):
            conn.idle_since = time.monotonic()
        super()._put_conn(conn)
