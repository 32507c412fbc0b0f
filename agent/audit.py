"""An append-only, hash-chained audit trail of every key use (JSON lines).

Each record carries ``seq`` (its line number when the trail was written), ``prev``
(the previous record's hash) and ``hash`` (SHA-256 of the record's canonical JSON
without ``hash``). So :func:`verify` can say which line was edited (its hash does
not match, or the next record no longer chains to it) and which records were
removed (a gap in ``seq``). Records hold the SHA-256 of the signed input, never
the input itself. Every record is written to the file (``write(2)``) before the signature is
returned, so it survives the agent crashing or being killed; when it also reaches the disk depends on
``[daemon] audit_sync``:

* ``"always"`` (the default): the signature is returned only once its record is durable (``fdatasync``).
  Group commit: records are appended in ``seq`` order under one lock, then each caller waits until an
  ``fdatasync`` that started after its own write has returned. Callers arriving while a sync runs share the
  next one, so concurrent signers pay one disk flush per batch instead of one each.
* ``"interval"``: a background thread syncs at most every ``audit_sync_interval_ms`` (when records were
  written since its last sync), so no request waits for the disk. An OS crash or power cut may lose the
  records of the last interval. A sync the disk refuses fails every later ``record`` (so signing stops, as
  with ``"always"``) until a sync succeeds.

Several processes may append to one trail (the daemon, and the CLI signing on the token directly): each
append holds ``flock`` on the file, and a process that finds the file grown since its own last append first
reads the tail, so the chain continues from the other process's last record. A process that signs all day
beside others (the daemon's serving processes, ``[daemon] processes`` > 1) keeps a trail of its own instead,
:func:`own_trail`: ``audit.1.jsonl``, ``audit.2.jsonl``… next to ``audit.jsonl``, each held with ``flock``
for the writer's lifetime, so its appends take no lock, no ``fstat`` and no tail read (that cost 39 to 46 µs of
CPU per record with two serving processes on one file, where 96% of appends first read the other's tail).
:func:`trail_files` lists a trail and its siblings; ``tpp-agent audit verify`` checks them all.

Removing records at the *end* of the trail is not visible in the trail itself;
the daemon reports the last ``seq`` in its journal status for that reason.

Flows sign deep inside (JWS, client assertions, request objects, bank calls): they get an
:class:`AuditedKeyStore` and an :class:`AuditedBankCalls` observer, which record each key use for the caller
named with :func:`on_behalf_of` (the daemon: the socket peer; the CLI: the operator running it).
"""

from __future__ import annotations

import contextvars
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from agent.clock import utc_iso
from agent.errors import AgentError
from agent.log import get_logger
from pkcs11_backends.keys import KeyStore, SignatureScheme
from pkcs11_backends.uri import Pkcs11Uri

if TYPE_CHECKING:
    from agent.openfinance.service import BankCall

GENESIS = "0" * 64
_SYNC_HINT = "check the disk holding the audit trail (dmesg); signing resumes once a sync succeeds"
log = get_logger("tpp-agent.audit")
_FIELDS = ("seq", "time", "uid", "pid", "key", "operation", "algorithm", "input_sha256", "result",
           "interaction_id", "prev")


class AuditError(AgentError):
    hint = "check that the audit file's directory exists and is writable by the agent only"


def _canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


# How every line _covered() makes ends (JSON escapes any quote inside a string, so no value can fake it).
_OUR_ENDING = re.compile(rb'"seq":(\d+),"time":"[^"\\]*","uid":\d+,"hash":"([0-9a-f]{64})"}$')
_quote = json.encoder.encode_basestring_ascii  # how json.dumps(ensure_ascii=True) writes a string


def _covered(use: KeyUse, seq: int, prev: str, stamp: str, input_sha256: str) -> bytes:
    """``_canonical`` of a new record, spelled out: the same bytes (verify derives them with ``_canonical``)
    for a fraction of the cost, as one is made per signature."""
    return (f'{{"algorithm":{_quote(use.algorithm)},"input_sha256":"{input_sha256}",'
            f'"interaction_id":{_quote(use.interaction_id)},"key":{_quote(use.key)},'
            f'"operation":{_quote(use.operation)},"pid":{int(use.pid)},"prev":"{prev}",'
            f'"result":{_quote(use.result)},"seq":{seq},"time":"{stamp}","uid":{int(use.uid)}}}').encode("ascii")


def record_hash(record: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


class KeyUse(NamedTuple):
    """One use of a key, as the caller knows it (a tuple: one is made per signature)."""

    uid: int
    pid: int
    key: str
    operation: str
    algorithm: str
    signed_input: bytes
    result: str
    interaction_id: str


class _FileLock:
    """``flock(2)`` on the trail for a ``with`` block; a class, not a generator: every record takes it."""

    __slots__ = ("_fd", "_path")

    def __init__(self, fd: int, path: Path) -> None:
        self._fd, self._path = fd, path

    def __enter__(self) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except OSError as exc:
            raise AuditError(f"cannot lock the audit trail {self._path}: {exc.strerror}") from None

    def __exit__(self, *_: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)


class TrailBusyError(AuditError):
    """Another living process holds this trail as its own."""


class AuditTrail:
    def __init__(self, path: Path, sync_interval: float | None = None, *, exclusive: bool = False) -> None:
        """``sync_interval``: None syncs each record before :meth:`record` returns; seconds leave the sync to a
        background thread that runs at most that often (see the module docstring). ``exclusive``: the trail is
        this process's alone until it closes (:class:`TrailBusyError` if another process holds it)."""
        self.path = path
        self._exclusive = exclusive
        self._lock = threading.Lock()  # seq order: chaining and appending a record
        self._durable = threading.Condition()  # group commit: who syncs, and up to which seq
        self._syncing = False
        try:
            path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            # Readable too: the tail another process appended is read through this descriptor.
            self._fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise AuditError(f"cannot open the audit trail {path}: {exc.strerror}") from None
        self._seq, self._prev = 0, GENESIS
        self._size = -1  # the file's size after our last append (-1: the tail was never read)
        try:
            if exclusive:
                self._hold()
                self._catch_up()
            else:
                with self._file_lock():
                    self._catch_up()
        except BaseException:
            os.close(self._fd)
            raise
        self._synced = self._seq
        self._failed = 0  # the highest seq covered by a failed sync
        self._refused = ""  # interval mode: why the last background sync failed ("" once one succeeds)
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        if sync_interval is not None:
            # A timer, not a wake-up per record: requests never hand work to this thread.
            self._flusher = threading.Thread(target=self._flush_every, args=(sync_interval,), name="audit-sync",
                                             daemon=True)
            self._flusher.start()

    @property
    def last_seq(self) -> int:
        return self._seq

    @property
    def synced_seq(self) -> int:
        """The last record this process saw reach the disk (an ``fdatasync`` returned after it was written)."""
        return self._synced

    def record(self, use: KeyUse) -> None:
        """Append one record and return once it is written (and, syncing always, durable).

        Raises :class:`AuditError` if it is not, or (syncing at intervals) if the last background sync failed.
        """
        stamp = utc_iso()
        input_sha256 = hashlib.sha256(use.signed_input).hexdigest()
        with self._lock:
            if self._exclusive:  # nobody else appends: the chain goes on from our own last record
                seq = self._append(use, stamp, input_sha256)
            else:
                with self._file_lock():
                    self._catch_up()
                    seq = self._append(use, stamp, input_sha256)
        if self._flusher is None:
            self._sync(seq)
        elif self._refused:
            raise AuditError(self._refused, hint=_SYNC_HINT)

    def _append(self, use: KeyUse, stamp: str, input_sha256: str) -> int:
        """Under both locks (or holding the trail): write the next record; its seq."""
        seq = self._seq + 1
        covered = _covered(use, seq, self._prev, stamp, input_sha256)  # what the hash covers
        digest = hashlib.sha256(covered).hexdigest()
        line = covered[:-1] + b',"hash":"' + digest.encode("ascii") + b'"}\n'
        try:
            written = os.write(self._fd, line)
            # Nobody else appends meanwhile, so the file grew by our line alone (a short write: ask the kernel).
            self._size = self._size + written if written == len(line) else os.fstat(self._fd).st_size
        except OSError as exc:
            raise AuditError(f"cannot write the audit trail {self.path}: {exc.strerror}") from None
        self._seq, self._prev = seq, digest
        return seq

    def _hold(self) -> None:
        """Take the trail for this process's lifetime (the kernel lets go when it ends, however it ends)."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TrailBusyError(f"the audit trail {self.path} is another running process's own",
                                 hint="each serving process takes the next free audit.N.jsonl") from None
        except OSError as exc:
            raise AuditError(f"cannot lock the audit trail {self.path}: {exc.strerror}") from None

    def _file_lock(self) -> _FileLock:
        """Exclusive use of the file's end among processes (released by the kernel if this one dies)."""
        return _FileLock(self._fd, self.path)

    def _catch_up(self) -> None:
        """Under the file lock: continue the chain from what another process appended since our last append."""
        try:
            size = os.fstat(self._fd).st_size
            if size == self._size:
                return
            self._seq, self._prev, torn = _tail(self._fd, self.path, size)
            if torn:
                # A crash cut the last line short: end it, so the next record starts on a line of its own.
                size += os.write(self._fd, b"\n")
                self._seq += 1
            self._size = size
        except OSError as exc:
            raise AuditError(f"cannot read the audit trail {self.path}: {exc.strerror}") from None

    def _sync(self, seq: int) -> None:
        """Return once record ``seq`` is durable: lead a sync, or wait for the one that covers it."""
        with self._durable:
            while self._synced < seq:
                if self._failed >= seq:
                    raise AuditError(f"cannot write the audit trail {self.path}: the disk refused to sync it")
                if self._syncing:
                    self._durable.wait()
                    continue
                self._syncing = True
                covered = self._seq  # every record up to here has been written (os.write returned)
                self._durable.release()
                try:
                    os.fdatasync(self._fd)  # an append's new size is flushed too: the data is reachable
                    failed = False
                except OSError:
                    failed = True
                finally:
                    self._durable.acquire()
                    self._syncing = False
                    self._durable.notify_all()
                if failed:
                    self._failed = max(self._failed, covered)
                else:
                    self._synced = max(self._synced, covered)

    def _flush_every(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self._flush()

    def _flush(self) -> None:
        """Interval mode: sync what was written since the last successful sync, if anything."""
        covered = self._seq  # every record up to here has been written (os.write returned)
        if covered <= self._synced:
            return
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            if not self._refused:
                log.error("audit_sync_failed", file=str(self.path), error=exc.strerror, unsynced_from=self._synced + 1)
            self._refused = f"the disk refused to sync the audit trail {self.path}: {exc.strerror}"
            return
        if self._refused:
            log.info("audit_sync_recovered", file=str(self.path), synced_seq=covered)
        self._synced, self._refused = covered, ""

    def close(self) -> None:
        """Stop the background sync (if any) after a last sync; raises :class:`AuditError` if that one fails."""
        if self._flusher is not None:
            self._stop.set()
            self._flusher.join()
        with self._lock:
            if self._fd < 0:
                return
            if self._flusher is not None:
                self._flush()
            refused = self._refused
            os.close(self._fd)
            self._fd = -1
        if refused:
            raise AuditError(f"{refused}; records after {self._synced} may not be on disk", hint=_SYNC_HINT)


_MAX_OWN_TRAILS = 256  # far more serving processes than any host has CPUs


def _sibling(base: Path, number: int) -> Path:
    """``audit.jsonl`` → ``audit.3.jsonl`` (``audit`` → ``audit.3``)."""
    return base.with_name(f"{base.stem}.{number}{base.suffix}") if base.suffix else base.with_name(
        f"{base.name}.{number}")


def own_trail(base: Path, sync_interval: float | None = None) -> AuditTrail:
    """The first of ``base``'s siblings (``audit.1.jsonl``, ``audit.2.jsonl``…) that no living process holds,
    held by this one until it closes; its chain continues from where its last writer left it."""
    for number in range(1, _MAX_OWN_TRAILS + 1):
        try:
            return AuditTrail(_sibling(base, number), sync_interval, exclusive=True)
        except TrailBusyError:
            continue
    raise AuditError(f"all {_MAX_OWN_TRAILS} trails next to {base} are held by running processes",
                     hint="stop the stray tpp-agent processes (pgrep -a tpp-agent)")


def trail_files(base: Path) -> list[Path]:
    """``base`` (if it exists) and its siblings by number: every file of one trail."""
    pattern = re.compile(re.escape(base.stem if base.suffix else base.name) + r"\.([1-9][0-9]*)"
                         + re.escape(base.suffix) + "$")
    numbered = [(int(found[1]), path) for path in base.parent.glob("*")
                if (found := pattern.match(path.name)) is not None and path.is_file()]
    return ([base] if base.is_file() else []) + [path for _, path in sorted(numbered)]


def _tail(fd: int, path: Path, size: int) -> tuple[int, str, bool]:
    """(seq, hash, torn) of the trail's last record (the file is ``size`` bytes); a torn last line still counts
    as a line."""
    if size == 0:
        return 0, GENESIS, False
    # A record is ~450 bytes: 1 KiB holds the last one unless damage follows it. Serving processes that share
    # the trail read its tail on most appends, so the small read comes first, and a line this agent wrote is
    # read by its known ending rather than parsed whole.
    for window in (1024, 65536):
        start = max(0, size - window)
        chunk = os.pread(fd, size - start, start)
        torn = not chunk.endswith(b"\n")
        lines = chunk.rstrip(b"\n").split(b"\n")
        for raw in reversed(lines[1:] if start else lines):  # a window may begin mid-line
            ours = _OUR_ENDING.search(raw)
            if ours is not None:
                return int(ours[1]), ours[2].decode("ascii"), torn
            try:
                last = json.loads(raw)
                return int(last["seq"]), str(last["hash"]), torn
            except (ValueError, KeyError, TypeError):
                continue
        if not start:
            break
    raise AuditError(f"the audit trail {path} ends with no readable record",
                     hint="run `tpp-agent audit verify`, then move the damaged file aside")


class Caller(NamedTuple):
    """Who a key is used for: the process that asked, the operation it asked for, its interaction id."""

    uid: int
    pid: int
    operation: str
    interaction_id: str


_caller: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("tpp_agent_caller", default=None)


class on_behalf_of:  # lower case: callers use it as the function it used to be
    """Attribute the key uses made inside the block (audited store, audited bank calls) to this caller.

    A class rather than a generator: every request that signs enters one.
    """

    __slots__ = ("_caller", "_reset")

    def __init__(self, uid: int, pid: int, operation: str, interaction_id: str) -> None:
        self._caller = Caller(uid, pid, operation, interaction_id)

    def __enter__(self) -> None:
        self._reset = _caller.set(self._caller)

    def __exit__(self, *_: object) -> None:
        _caller.reset(self._reset)


def current_caller(what: str) -> Caller:
    caller = _caller.get()
    if caller is None:
        # A code path that uses a key without saying for whom is a bug: refuse rather than use it unaudited.
        raise RuntimeError(f"{what} outside on_behalf_of()")
    return caller


class AuditedKeyStore(KeyStore):
    """The same token keys (same session pool and aliases), every ``sign`` audited.

    A signature is returned only once its record is written (and synced, as ``[daemon] audit_sync`` says); a
    failed signature is recorded too.
    """

    def __init__(self, store: KeyStore, audit: AuditTrail) -> None:
        super().__init__(store.pool, store.aliases)
        self.audit = audit

    def sign(self, name: str | Pkcs11Uri, data: bytes, scheme: SignatureScheme,
             timeout: float | None = None) -> bytes:
        caller = current_caller("AuditedKeyStore.sign")
        key = self.aliases.get(name, name) if isinstance(name, str) else str(name)
        use = KeyUse(caller.uid, caller.pid, key, caller.operation, scheme.jose_name, data, "ok",
                     caller.interaction_id)
        try:
            signature = super().sign(name, data, scheme, timeout)
        except Exception as exc:
            self.audit.record(use._replace(result=f"error: {type(exc).__name__}"))
            raise
        self.audit.record(use)
        return signature


class AuditedBankCalls:
    """An ``OpenFinance`` observer: every request sent with the transport key (TLS client authentication) is a
    use of that key, recorded like a signature."""

    def __init__(self, audit: AuditTrail) -> None:
        self.audit = audit

    def bank_call(self, call: BankCall) -> None:
        caller = current_caller(f"a request to bank {call.bank!r}")
        self.audit.record(KeyUse(caller.uid, caller.pid, call.key, caller.operation, "tls-client-auth",
                                 f"{call.method} {call.url}\n".encode() + (call.body or b""), call.result,
                                 call.interaction_id or caller.interaction_id))


@dataclasses.dataclass(frozen=True)
class Finding:
    line: int
    problem: str

    def __str__(self) -> str:
        return f"{self.line}: {self.problem}"


def verify(path: Path) -> tuple[int, list[Finding]]:
    """Check the chain; returns (records read, findings). No findings means intact."""
    findings: list[Finding] = []
    expected_seq, prev_hash, count = 1, GENESIS, 0
    for lineno, raw in _lines(path):
        count += 1
        try:
            record = json.loads(raw)
            if not isinstance(record, dict) or any(f not in record for f in (*_FIELDS, "hash")):
                raise ValueError("missing fields")
            seq = int(record["seq"])
        except (ValueError, TypeError):
            findings.append(Finding(lineno, "not an audit record (edited or damaged)"))
            expected_seq += 1
            prev_hash = ""
            continue
        self_ok = record_hash(record) == record["hash"]
        if not self_ok:
            findings.append(Finding(lineno, f"edited: record {seq} does not match its hash"))
        if seq > expected_seq:
            missing = f"record {expected_seq}" if seq == expected_seq + 1 else f"records {expected_seq}-{seq - 1}"
            findings.append(Finding(lineno, f"removed: {missing} missing before this line "
                                            f"(record {seq} follows record {expected_seq - 1})"))
        elif seq < expected_seq:
            findings.append(Finding(lineno, f"out of order: record {seq} after record {expected_seq - 1}"))
        elif prev_hash and record["prev"] != prev_hash and self_ok:
            findings.append(Finding(lineno - 1, f"edited: the record on line {lineno} no longer chains to it"))
        expected_seq, prev_hash = seq + 1, str(record["hash"])
    return count, findings


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    try:
        with path.open("rb") as handle:
            for lineno, raw in enumerate(handle, start=1):
                yield lineno, raw.rstrip(b"\n")
    except FileNotFoundError:
        raise AuditError(f"no audit trail at {path}", hint="pass --file PATH or check [daemon] audit_file") from None
