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
  Group commit: records are appended in ``seq`` order under one lock, and one sync covers every record
  appended before it started. The daemon's local workers do not wait for it: their answers wait, on the
  committer thread, which syncs everything appended since its last sync and then sends every answer that sync
  covered (:meth:`AuditTrail.when_durable`; agent/waiting.py), so the records sharing a sync are not capped
  at ``workers``. Other callers wait for a sync that started after their own write, leading one if none runs.
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

Signed checkpoints anchor the chain (:meth:`AuditTrail.anchor`): records of the chain signed on the token by
``[daemon] audit_checkpoint_key`` at start, every ``audit_checkpoint_seconds`` and at stop, each listing the
trail's files and their sizes; :func:`verify_anchored` checks them. The writer checks that its file is still
the one it wrote (not deleted, replaced or shortened) at each sync and checkpoint, and refuses every later
record if not. docs/audit.md has the threat model: what someone who can write the file can and cannot hide.

Flows sign deep inside (JWS, client assertions, request objects, bank calls): they get an
:class:`AuditedKeyStore` and an :class:`AuditedBankCalls` observer, which record each key use for the caller
named with :func:`on_behalf_of` (the daemon: the socket peer; the CLI: the operator running it).
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from agent import files, waiting
from agent.clock import utc_iso
from agent.errors import AgentError, ConfigError
from agent.log import get_logger
from pkcs11_backends.decryption import TokenDecryptor
from pkcs11_backends.errors import KeyNotFoundError, Pkcs11Error, UriError
from pkcs11_backends.keys import KeyKind, KeyStore, SignatureScheme
from pkcs11_backends.uri import Pkcs11Uri

if TYPE_CHECKING:
    from agent.openfinance.service import BankCall

GENESIS = "0" * 64
_SYNC_HINT = "check the disk holding the audit trail (dmesg); signing resumes once a sync succeeds"
_CUT_HINT = ("copy the trail files aside as evidence, run `tpp-agent audit verify`, then restart the agent: it "
             "continues the chain from what the file holds now, in a new checkpointed segment (docs/audit.md)")
CHECKPOINT = "checkpoint"  # the operation of a checkpoint record
log = get_logger("tpp-agent.audit")
_FIELDS = ("seq", "time", "uid", "pid", "key", "operation", "algorithm", "input_sha256", "result",
           "interaction_id", "prev")
_CHECKPOINT_FIELDS = ("seq", "time", "uid", "pid", "operation", "event", "key", "key_sha256", "algorithm", "files",
                      "prev", "signature")


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


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclasses.dataclass(frozen=True)
class Anchor:
    """The token key that signs checkpoints ([daemon] audit_checkpoint_key) and how to sign with it."""

    key: str  # its pkcs11: URI
    spki: bytes  # its SubjectPublicKeyInfo (DER): what verify checks signatures with
    scheme: SignatureScheme
    sign: Callable[[bytes], bytes]

    @property
    def key_sha256(self) -> str:
        return hashlib.sha256(self.spki).hexdigest()


def checkpoint_key_uri(store: KeyStore, name: str) -> str:
    """[daemon] audit_checkpoint_key as a key name: an alias, a pkcs11: URI, else the label of a key on the
    agent's token (the default, ``audit``, is what softhsm/make_token.py creates)."""
    if name in store.aliases or name.lower().startswith("pkcs11:"):
        return name
    return f"pkcs11:object={urllib.parse.quote(name, safe='')};type=private"


def anchor_on(store: KeyStore, name: str) -> Anchor:
    """The checkpoint key ``name`` (see :func:`checkpoint_key_uri`) on ``store``'s token; raises
    :class:`~pkcs11_backends.errors.KeyNotFoundError` if it is not there."""
    name = checkpoint_key_uri(store, name)
    uri = store.resolve(name)
    info = store.info(name)
    if info.spec.kind is KeyKind.RSA:
        scheme = SignatureScheme.RSA_PSS_SHA256
    else:
        scheme = SignatureScheme.ECDSA_SHA384 if info.spec.bits == 384 else SignatureScheme.ECDSA_SHA256
    return Anchor(str(info.uri), store.public_key_info(name).dump(), scheme,
                  lambda data: store.sign(uri, data, scheme))


def find_anchor(store: KeyStore, name: str, *, required: bool, warn: bool = True) -> Anchor | None:
    """The checkpoint key ``name`` ([daemon] audit_checkpoint_key); None (after a warning, if ``warn``) if it is
    not on the token and was not named explicitly (``required``), where :class:`ConfigError` says so
    otherwise."""
    try:
        return anchor_on(store, name)
    except (KeyNotFoundError, UriError) as exc:
        hint = (f"create it: tpp-agent keys generate --label {name} --type ec:p256 (and [keys.{name}] "
                f'purpose = "audit"), or name another key in [daemon] audit_checkpoint_key')
        if required:
            raise ConfigError(f"[daemon] audit_checkpoint_key: {exc}", hint=hint) from None
        (log.warning if warn else log.debug)(
            "audit_unanchored", key=name, error=str(exc), hint=hint,
            consequence="no checkpoints are signed: removed or rewritten records would not show")
        return None


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
    def __init__(self, path: Path, sync_interval: float | None = None, *, exclusive: bool = False,
                 family: Path | None = None) -> None:
        """``sync_interval``: None syncs each record before :meth:`record` returns; seconds leave the sync to a
        background thread that runs at most that often (see the module docstring). ``exclusive``: the trail is
        this process's alone until it closes (:class:`TrailBusyError` if another process holds it).
        ``family``: the base trail whose sibling this is (checkpoints list the family's files)."""
        self.path = path
        self._exclusive = exclusive
        self._lock = threading.Lock()  # seq order: chaining and appending a record
        self._durable = threading.Condition()  # group commit: who syncs, and up to which seq
        self._syncing = False
        self.family = family or path  # the trail this file belongs to (audit.jsonl for audit.3.jsonl)
        try:
            # Readable too: the tail another process appended is read through this descriptor.
            self._fd = files.open_in(path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
            self._inode = os.fstat(self._fd).st_ino
        except OSError as exc:
            raise AuditError(f"cannot open the audit trail {path}: {exc.strerror}") from None
        except files.UnsafePathError as exc:
            raise AuditError(f"cannot open the audit trail {path}: {exc}", hint=exc.hint) from None
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
        self._synced = self.first_seq = self._seq
        self._pending_since = 0.0  # when the oldest record not yet durable was written (see sync_lag)
        self._failed = 0  # the highest seq covered by a failed sync
        self._refused = ""  # interval mode: why the last background sync failed ("" once one succeeds)
        self._cut = ""  # why the file can no longer be trusted to hold what was written ("": it can)
        self._anchor: Anchor | None = None
        self._anchored = self._seq  # the seq of the last checkpoint this process wrote (or found on opening)
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        self._checkpointer: threading.Thread | None = None
        self._deferred: list[tuple[int, Callable[[Exception | None], None]]] = []  # answers awaiting a sync
        self._committer: threading.Thread | None = None
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

    def sync_lag(self) -> float:
        """Seconds the oldest record not yet durable has waited (0.0 when every record written is)."""
        pending_since = self._pending_since  # read first: a sync may land meanwhile, and then lag is 0
        return 0.0 if self._synced >= self._seq else max(0.0, time.monotonic() - pending_since)

    @property
    def cut(self) -> str:
        """Why the trail was found cut, replaced or rewritten under this process ("" while it was not): no
        record is written after that (see docs/audit.md)."""
        return self._cut

    def record(self, use: KeyUse) -> None:
        """Append one record and return once it is written (and, syncing always, durable).

        Raises :class:`AuditError` if it is not, or (syncing at intervals) if the last background sync failed.
        """
        if self._cut:
            raise AuditError(self._cut, hint=_CUT_HINT)
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
            pending = waiting.deferred()
            if pending is None:
                self._sync(seq)
            else:  # the daemon's answer waits for it instead (when_durable), not this thread
                pending.append((self, seq))
        elif self._refused:
            raise AuditError(self._refused, hint=_SYNC_HINT)

    def when_durable(self, seq: int, then: Callable[[Exception | None], None]) -> None:
        """Call ``then(None)`` once record ``seq`` is durable, or ``then(error)`` if its sync failed: at once if
        it is, else from the committer thread, which syncs every record appended since its last sync and then
        calls everyone that sync covered (see agent/waiting.py)."""
        with self._durable:
            if self._synced < seq:
                self._deferred.append((seq, then))
                if self._committer is None:
                    self._committer = threading.Thread(target=self._commit, name="audit-commit", daemon=True)
                    self._committer.start()
                self._durable.notify_all()
                return
        then(None)

    def _commit(self) -> None:
        while True:
            with self._durable:
                while not self._deferred and not self._stop.is_set():
                    self._durable.wait()
                if not self._deferred:
                    self._committer = None  # a later when_durable starts another: its answer is not lost
                    return
                target = max(seq for seq, _ in self._deferred)
            error: AuditError | None = None
            try:
                self._sync(target)
            except AuditError as exc:
                error = exc
            except Exception as exc:  # a dead committer would leave every later answer waiting
                log.exception("audit_commit_failed", file=str(self.path))
                error = AuditError(f"cannot sync the audit trail {self.path}: {type(exc).__name__}: {exc}",
                                   hint=_SYNC_HINT)
            with self._durable:
                done = [(seq, then) for seq, then in self._deferred if seq <= target]
                self._deferred = [(seq, then) for seq, then in self._deferred if seq > target]
            for seq, then in done:
                try:
                    then(None if seq <= self._synced else error)
                except Exception:  # one answer that cannot be sent must not keep the others waiting
                    log.exception("audit_commit_callback_failed")

    def _append(self, use: KeyUse, stamp: str, input_sha256: str) -> int:
        """Under both locks (or holding the trail): write the next record; its seq."""
        seq = self._seq + 1
        self._write(seq, _covered(use, seq, self._prev, stamp, input_sha256))
        return seq

    def _write(self, seq: int, covered: bytes) -> None:
        """Under both locks (or holding the trail): append record ``seq``, ``covered`` being what its hash
        covers (its canonical JSON without ``hash``)."""
        digest = hashlib.sha256(covered).hexdigest()
        line = covered[:-1] + b',"hash":"' + digest.encode("ascii") + b'"}\n'
        try:
            written = os.write(self._fd, line)
            # Nobody else appends meanwhile, so the file grew by our line alone (a short write: ask the kernel).
            self._size = self._size + written if written == len(line) else os.fstat(self._fd).st_size
        except OSError as exc:
            raise AuditError(f"cannot write the audit trail {self.path}: {exc.strerror}") from None
        if self._synced == self._seq:  # the first record the disk does not have yet
            self._pending_since = time.monotonic()
        self._seq, self._prev = seq, digest

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
            if size < self._size:  # other writers only ever append
                raise self._found_cut(f"it shrank from {self._size} to {size} bytes")
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
                covered, size = self._seq, self._size  # every record up to here has been written
                self._durable.release()
                try:
                    os.fdatasync(self._fd)  # an append's new size is flushed too: the data is reachable
                    failed = False
                    # Once per sync, not per record: the file is still the one we write, as long as we wrote it.
                    problem = self._still_ours(size)
                except OSError:
                    failed, problem = True, ""
                finally:
                    self._durable.acquire()
                    self._syncing = False
                    self._durable.notify_all()
                if problem:
                    self._failed = max(self._failed, covered)
                    raise self._found_cut(problem)
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
            problem = self._still_ours(self._size)
        except OSError as exc:
            if not self._refused:
                log.error("audit_sync_failed", file=str(self.path), error=exc.strerror, unsynced_from=self._synced + 1)
            self._refused = f"the disk refused to sync the audit trail {self.path}: {exc.strerror}"
            return
        if problem:
            self._found_cut(problem)
            return
        if self._refused:
            log.info("audit_sync_recovered", file=str(self.path), synced_seq=covered)
        self._synced, self._refused = covered, ""

    # -- anchoring -----------------------------------------------------------
    def anchor(self, anchor: Anchor, interval: float | None) -> None:
        """Sign a checkpoint now with ``anchor``'s token key, then every ``interval`` seconds (when records
        were written since the last one, and after a check that the file is still as written), and at
        :meth:`close`. A checkpoint is a record of the chain: rewriting anything before it needs the key."""
        self._anchor = anchor
        self.checkpoint("start")
        if interval is not None:
            self._checkpointer = threading.Thread(target=self._checkpoint_every, args=(interval,),
                                                  name="audit-checkpoint", daemon=True)
            self._checkpointer.start()

    def checkpoint(self, event: str) -> int:
        """Append a signed checkpoint (``event``: start, interval or stop) and sync it; its seq."""
        anchor = self._anchor
        if anchor is None:
            raise AuditError("this audit trail has no checkpoint key")
        if self._cut:
            raise AuditError(self._cut, hint=_CUT_HINT)
        with self._lock:
            if self._exclusive:
                seq = self._append_checkpoint(anchor, event)
            else:
                with self._file_lock():
                    self._catch_up()
                    seq = self._append_checkpoint(anchor, event)
        self._sync(seq)
        log.info("audit_checkpoint", file=str(self.path), kind=event, seq=seq, hash=self._prev)
        return seq

    def _append_checkpoint(self, anchor: Anchor, event: str) -> int:
        """Under both locks (or holding the trail): check the file's end, then write a signed checkpoint."""
        problem = self._still_ours(self._size) or self._tail_problem()
        if problem:
            raise self._found_cut(problem)
        seq = self._seq + 1
        record: dict[str, Any] = {
            "seq": seq, "time": utc_iso(), "uid": os.getuid(), "pid": os.getpid(), "operation": CHECKPOINT,
            "event": event, "key": anchor.key, "key_sha256": anchor.key_sha256,
            "algorithm": anchor.scheme.jose_name, "files": self._family_sizes(), "prev": self._prev}
        record["signature"] = _b64(anchor.sign(_canonical(record)))
        self._write(seq, _canonical(record))
        self._anchored = seq
        return seq

    def _family_sizes(self) -> dict[str, int]:
        """Every file of this trail, and its size now (a file of the trail only ever grows)."""
        sizes = {}
        for path in trail_files(self.family):
            with contextlib.suppress(OSError):
                sizes[path.name] = path.lstat().st_size
        return sizes

    def _checkpoint_every(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                if self._seq != self._anchored:
                    self.checkpoint("interval")
                else:
                    with self._lock:  # nothing new to sign: the file must still be as we left it
                        problem = self._still_ours(self._size) or self._tail_problem()
                    if problem:
                        self._found_cut(problem)
            except (AuditError, Pkcs11Error) as exc:
                if not self._cut:
                    log.error("audit_checkpoint_failed", file=str(self.path), error=str(exc))

    def _still_ours(self, size: int) -> str:
        """What is wrong with the file we append to, if it is no longer the one we wrote ``size`` bytes of;
        "" when all is well. Costs two ``stat`` calls."""
        found = os.fstat(self._fd)
        if found.st_nlink == 0:
            return "it was deleted"
        if found.st_size < size:
            return f"it shrank from {size} to {found.st_size} bytes"
        try:
            named = os.lstat(self.path)
        except FileNotFoundError:
            return "it was moved away"
        if named.st_ino != self._inode:
            return "another file took its name"
        return ""

    def _tail_problem(self) -> str:
        """Under the locks: "" when the file ends with the record this process last wrote or read."""
        if self._size <= 0 or os.fstat(self._fd).st_size != self._size:
            return ""  # empty, or others appended since (shared trail): their tail is read under the file lock
        seq, digest, _ = _tail(self._fd, self.path, self._size)
        if (seq, digest) != (self._seq, self._prev):
            return f"its last record is no longer record {self._seq} as written"
        return ""

    def _found_cut(self, problem: str) -> AuditError:
        """Stop writing: log it once; the error every later record and checkpoint raises."""
        if not self._cut:
            self._cut = (f"the audit trail {self.path} was cut or replaced under the agent ({problem}) after record "
                         f"{self._seq}; key use is refused")
            log.error("audit_trail_cut", file=str(self.path), problem=problem, last_seq=self._seq,
                      last_hash=self._prev, last_checkpoint=self._anchored, hint=_CUT_HINT)
        return AuditError(self._cut, hint=_CUT_HINT)

    def close(self) -> None:
        """Stop the background threads, write the closing checkpoint (anchored trails) and a last sync; raises
        :class:`AuditError` if either fails."""
        self._stop.set()
        if self._checkpointer is not None:
            self._checkpointer.join()
        if self._committer is not None:  # it sends the answers still waiting, then ends
            with self._durable:
                self._durable.notify_all()
            self._committer.join()
        closing = ""
        if self._anchor is not None and self._fd >= 0 and not self._cut:
            try:
                self.checkpoint("stop")
            except (AuditError, Pkcs11Error) as exc:
                closing = f"; the closing checkpoint was not written: {exc}"
                log.error("audit_checkpoint_failed", file=str(self.path), error=str(exc))
        if self._flusher is not None:
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
            raise AuditError(f"{refused}; records after {self._synced} may not be on disk{closing}", hint=_SYNC_HINT)
        if closing:
            raise AuditError(f"the audit trail {self.path} was not closed{closing}",
                             hint="its records are written; the next checkpoint anchors them (check the token)")


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
            return AuditTrail(_sibling(base, number), sync_interval, exclusive=True, family=base)
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


# How long a token call took, and how it failed (agent.metrics.Metrics.hsm_call).
TokenCallTimer = Callable[[str, float, BaseException | None], None]


class AuditedKeyStore(KeyStore):
    """The same token keys (same session pool, and the same aliases: a rotation's switch is in force for both at
    once), every ``sign`` and every decryption audited.

    A signature (a plaintext) is returned only once its record is written (and synced, as ``[daemon] audit_sync``
    says); a failed one is recorded too. Decryption is RSA-OAEP-256 only (:mod:`pkcs11_backends.decryption`: how
    the token does it, raw RSA included, stays inside that module).
    """

    def __init__(self, store: KeyStore, audit: AuditTrail, timed: TokenCallTimer | None = None) -> None:
        super().__init__(store.pool, names_of=store)
        self.audit = audit
        self._timed = timed
        self._decryptor = TokenDecryptor(self)  # keeps each key's probed OAEP route for this store's life

    def decrypt_oaep_sha256(self, name: str | Pkcs11Uri, ciphertext: bytes) -> bytes:
        """The plaintext of an RSA-OAEP-256 ciphertext, decrypted on the token with an encryption key."""
        return self._audited("decrypt", "AuditedKeyStore.decrypt_oaep_sha256", name, mechanism="RSA-OAEP-256",
                             data=ciphertext, call=lambda: self._decryptor.decrypt_oaep_sha256(name, ciphertext))

    def sign(self, name: str | Pkcs11Uri, data: bytes, scheme: SignatureScheme,
             timeout: float | None = None) -> bytes:
        return self._audited("sign", "AuditedKeyStore.sign", name, mechanism=scheme.jose_name, data=data,
                             call=functools.partial(super().sign, name, data, scheme, timeout))

    def _audited(self, kind: str, where: str, name: str | Pkcs11Uri, *, mechanism: str, data: bytes,
                 call: Callable[[], bytes]) -> bytes:
        """One key use on the token: timed, and recorded for its caller whether it worked or not."""
        caller = current_caller(where)
        key = self.aliases.get(name, name) if isinstance(name, str) else str(name)
        use = KeyUse(caller.uid, caller.pid, key, caller.operation, mechanism, data, "ok", caller.interaction_id)
        started = time.perf_counter()
        try:
            result = call()
        except Exception as exc:
            if self._timed is not None:
                self._timed(kind, time.perf_counter() - started, exc)
            self.audit.record(use._replace(result=f"error: {type(exc).__name__}"))
            raise
        if self._timed is not None:
            self._timed(kind, time.perf_counter() - started, None)
        self.audit.record(use)
        return result


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
    """Check the chain; returns (records read, findings). No findings means intact (but not anchored: see
    :func:`verify_anchored`)."""
    chain = _read_chain(path)
    return chain.count, chain.findings


@dataclasses.dataclass
class _Chain:
    count: int = 0
    findings: list[Finding] = dataclasses.field(default_factory=list)
    checkpoints: list[tuple[int, dict[str, Any]]] = dataclasses.field(default_factory=list)  # (line, record)
    last_seq: int = 0


def _read_chain(path: Path) -> _Chain:
    chain = _Chain()
    findings = chain.findings
    expected_seq, prev_hash = 1, GENESIS
    for lineno, raw in _lines(path):
        chain.count += 1
        try:
            record = json.loads(raw)
            fields = _CHECKPOINT_FIELDS if isinstance(record, dict) and record.get("operation") == CHECKPOINT \
                else _FIELDS
            if not isinstance(record, dict) or any(f not in record for f in (*fields, "hash")):
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
        if fields is _CHECKPOINT_FIELDS:
            chain.checkpoints.append((lineno, record))
        expected_seq, prev_hash, chain.last_seq = seq + 1, str(record["hash"]), seq
    return chain


@dataclasses.dataclass(frozen=True)
class TrailReport:
    """What :func:`verify_anchored` found in one file: problems (``findings``) and what it could not prove
    (``notes``: records not yet anchored by a checkpoint that a running agent will write)."""

    path: Path
    records: int
    findings: list[Finding]
    notes: list[str]


def verify_anchored(paths: list[Path], spki: bytes) -> list[TrailReport]:
    """Check each file's chain, its checkpoints' signatures against the checkpoint key ``spki`` (DER), that it
    ends with a closing checkpoint unless a running agent writes it, and that every file a checkpoint listed
    is still there, at least as long as it was then."""
    key_sha256 = hashlib.sha256(spki).hexdigest()
    chains = {path: _read_chain(path) for path in paths}
    reports = []
    for path, chain in chains.items():
        findings, notes = list(chain.findings), list[str]()
        open_sessions: dict[int, int] = {}  # writer pid -> line of its start checkpoint
        last_line, last_anchor, last_pid = 0, 0, 0
        for lineno, record in chain.checkpoints:
            seq = record["seq"]
            if record["key_sha256"] != key_sha256:
                findings.append(Finding(lineno, f"checkpoint {seq} was signed by another key "
                                                f"(SHA-256 {record['key_sha256']}), not the checkpoint key"))
            elif not _signature_verifies(record, spki):
                findings.append(Finding(lineno, f"checkpoint {seq}: its signature does not verify (it, or the "
                                                "records it anchors, were rewritten)"))
            pid = int(record["pid"])
            if record["event"] == "start":
                open_sessions[pid] = lineno
            elif record["event"] == "stop":
                open_sessions.pop(pid, None)
            last_line, last_anchor, last_pid = lineno, seq, pid
        if not chain.checkpoints:
            findings.append(Finding(chain.count, "no signed checkpoint: nothing anchors this trail (an emptied, "
                                                 "truncated or rebuilt file looks like this)"))
        else:
            unanchored = chain.last_seq - last_anchor
            running = [pid for pid in open_sessions if _running_agent(pid)]
            notes.extend(f"the writer pid {pid} (from line {line}) ended without its closing checkpoint (killed or "
                         "crashed); later checkpoints anchor what it wrote"
                         for pid, line in open_sessions.items() if pid not in running and pid != last_pid)
            if running:
                notes.append(f"being written by the running agent (pid {running[0]}): the {unanchored} record(s) "
                             f"after checkpoint {last_anchor} are anchored by its next checkpoint")
            elif last_pid in open_sessions or unanchored:
                findings.append(Finding(last_line, f"the trail ends {unanchored} record(s) after checkpoint "
                                                   f"{last_anchor} without a closing checkpoint, and no agent "
                                                   "writing it runs: records after it may have been removed (or "
                                                   "the agent was killed: its log has its last audit_checkpoint)"))
            findings.extend(_missing_files(path, chain.checkpoints[-1]))
        reports.append(TrailReport(path, chain.count, findings, notes))
    return reports


def _signature_verifies(record: dict[str, Any], spki: bytes) -> bool:
    from agent.daemon.app import verify_in_software  # the start-up canary's check: one verifier for both

    signed = _canonical({k: v for k, v in record.items() if k not in ("hash", "signature")})
    try:
        signature = base64.urlsafe_b64decode(str(record["signature"]) + "==")
        scheme = SignatureScheme.from_jose(str(record["algorithm"]))
        return verify_in_software(spki, signature, signed, scheme)
    except (ValueError, Pkcs11Error):
        return False


def _missing_files(path: Path, checkpoint: tuple[int, dict[str, Any]]) -> list[Finding]:
    lineno, record = checkpoint
    listed = record["files"] if isinstance(record["files"], dict) else {}
    findings = []
    for name, size in sorted(listed.items()):
        sibling = path.with_name(str(name))
        try:
            now = sibling.lstat().st_size
        except FileNotFoundError:
            findings.append(Finding(lineno, f"{sibling} is gone: checkpoint {record['seq']} saw it at {size} bytes"))
            continue
        if isinstance(size, int) and now < size:
            findings.append(Finding(lineno, f"{sibling} shrank to {now} bytes: checkpoint {record['seq']} saw it at "
                                            f"{size} bytes"))
    return findings


def _running_agent(pid: int) -> bool:
    """Whether ``pid`` is a tpp-agent process on this host (the writer of an open trail)."""
    try:
        return b"tpp-agent" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    try:
        fd = files.open_in(path, os.O_RDONLY, create_dir=False)
    except FileNotFoundError:
        raise AuditError(f"no audit trail at {path}", hint="pass --file PATH or check [daemon] audit_file") from None
    except files.UnsafePathError as exc:
        raise AuditError(f"not reading the audit trail {path}: {exc}", hint=exc.hint) from None
    except OSError as exc:
        raise AuditError(f"cannot read the audit trail {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            yield lineno, raw.rstrip(b"\n")
