"""Durable event queue (SQLite) and the publisher that drains it over MQTT with QoS 1.

Guarantees of :class:`Outbox`:

* **Durable before publish.** :meth:`Outbox.append` returns only after the event is committed
  to SQLite (WAL mode, ``synchronous=FULL``), so it survives a process crash *and* a power
  cut. ``FULL`` rather than ``NORMAL``: in WAL mode ``NORMAL`` may lose the last commits on
  power loss — the common failure of an edge host — and losing the meta row would also roll
  the ``seq`` counter back and *reuse* sequence numbers, which receivers would then discard as
  duplicates. Anomaly events are rare enough that one fsync per event is cheap.
* **Monotonic, never reused ``seq``.** Sequence numbers come from a counter in the ``meta``
  table, incremented in the same transaction as the insert; deleting events never lowers it.
* **At-least-once delivery.** An event is deleted only by :meth:`Outbox.ack`, which the
  publisher calls after the broker's PUBACK. Receivers de-duplicate by ``seq``.
* **Bounded, never silently.** Pending events are bounded by ``max_bytes`` (payload + topic
  bytes); appending beyond it drops the *oldest* pending events, adds them to the persisted
  :meth:`Outbox.dropped` counter and logs a warning (counts and seqs, never payloads).
* **A full disk is not fatal.** When SQLite cannot write (disk full, I/O error), the call
  raises :class:`OutboxError` and leaves nothing behind: no event stored, no ``seq`` consumed,
  no transaction left open. The outbox stays usable and the next write succeeds once space
  is back. Counting what could not be stored is the caller's business.
* **Thread safe.** One connection guarded by a lock; any thread may append, ack or read.
  One process per outbox file (transactions are ``BEGIN IMMEDIATE``, so a second process
  would serialise, but the byte accounting is per process).

:class:`OutboxPublisher` drains an outbox through a connected paho-mqtt 2.x client.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.throttle import ThrottledLog

__all__ = ["Outbox", "OutboxError", "OutboxItem", "OutboxPublisher"]

logger = logging.getLogger(__name__)

_SCHEMA_VERSION = 1
DEFAULT_MAX_BYTES = 64 * 1024 * 1024


class OutboxError(RuntimeError):
    """The outbox database cannot be opened or written, or an event cannot fit."""


@dataclass(frozen=True)
class OutboxItem:
    """One pending event: its sequence number, MQTT topic and payload bytes."""

    seq: int
    topic: str
    payload: bytes


class Outbox:
    """A durable, bounded FIFO of events in an SQLite file; see the module docstring.

    Raises :class:`OutboxError` (wrapping ``sqlite3.Error``) when the file cannot be opened or
    written. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: str | Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.path = Path(path)
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        try:
            # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE) in _tx().
            self._conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA busy_timeout=5000")
            # By default the WAL grows to ~4 MB (1000 pages) before a checkpoint and keeps that
            # size: a lot for the small state partitions of edge hosts. Events are rare and
            # small, so checkpointing every 100 pages costs little; a WAL that grew during a
            # long outage is truncated back after the checkpoint.
            self._conn.execute("PRAGMA wal_autocheckpoint=100")
            self._conn.execute("PRAGMA journal_size_limit=524288")
            with self._tx() as c:
                c.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
                c.execute(
                    "CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, topic TEXT NOT NULL,"
                    " payload BLOB NOT NULL, size INTEGER NOT NULL)"
                )
                for key, value in (("schema_version", _SCHEMA_VERSION), ("next_seq", 1), ("dropped", 0)):
                    c.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", (key, value))
                version = c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]
                if version != _SCHEMA_VERSION:
                    raise OutboxError(f"{self.path}: outbox schema {version}, this agent reads {_SCHEMA_VERSION}")
                self._bytes = int(c.execute("SELECT COALESCE(SUM(size), 0) FROM events").fetchone()[0])
        except sqlite3.Error as e:
            raise OutboxError(f"cannot open outbox {self.path}: {e}") from e

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
            self._conn.execute("COMMIT")  # may fail too (disk full): then roll back as well
        except BaseException:
            # SQLite may have rolled back by itself (SQLITE_FULL): a ROLLBACK outside a
            # transaction would raise and hide the real error. A transaction left open would
            # make every later BEGIN fail: the outbox would never recover.
            if self._conn.in_transaction:
                try:
                    self._conn.execute("ROLLBACK")
                except sqlite3.Error:
                    logger.exception("outbox %s: rollback failed", self.path)
            raise

    def append(self, topic: str, payload: bytes) -> int:
        """Store an event durably and return its ``seq``. See :meth:`append_with_seq`."""
        return self.append_with_seq(topic, lambda _seq: payload)

    def append_with_seq(self, topic: str, build: Callable[[int], bytes]) -> int:
        """Assign the next ``seq``, build the payload from it, store both durably; return ``seq``.

        For payloads that carry their own ``seq`` (``shared.messages.encode_event``): ``build``
        is called under the outbox lock with the assigned number and must not touch the outbox.
        If it raises, nothing is stored and the number is not consumed.

        When the event would push pending bytes over ``max_bytes``, the oldest pending events
        are dropped first (counted in :meth:`dropped`, logged). Raises :class:`OutboxError` if
        the event alone is larger than ``max_bytes`` or SQLite fails.
        """
        topic_bytes = len(topic.encode())
        with self._lock:
            try:
                with self._tx() as c:
                    seq = int(c.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()[0])
                    payload = bytes(build(seq))
                    size = len(payload) + topic_bytes
                    if size > self.max_bytes:
                        raise OutboxError(f"event of {size} bytes exceeds the outbox bound of {self.max_bytes}")
                    freed, dropped = self._drop_oldest_locked(c, self._bytes + size - self.max_bytes)
                    c.execute("UPDATE meta SET value=? WHERE key='next_seq'", (seq + 1,))
                    c.execute(
                        "INSERT INTO events (seq, topic, payload, size) VALUES (?, ?, ?, ?)",
                        (seq, topic, payload, size),
                    )
            except sqlite3.Error as e:
                raise OutboxError(f"cannot append to outbox {self.path}: {e}") from e
            self._bytes += size - freed
        if dropped:
            logger.warning(
                "outbox %s full (%d bytes): dropped the %d oldest pending events (seq %d..%d) for seq %d",
                self.path, self.max_bytes, len(dropped), dropped[0], dropped[-1], seq,
            )
        return seq

    def _drop_oldest_locked(self, c: sqlite3.Connection, excess: int) -> tuple[int, list[int]]:
        if excess <= 0:
            return 0, []
        freed, seqs = 0, []
        for seq, size in c.execute("SELECT seq, size FROM events ORDER BY seq"):
            seqs.append(seq)
            freed += size
            if freed >= excess:
                break
        c.execute("DELETE FROM events WHERE seq <= ?", (seqs[-1],))
        c.execute("UPDATE meta SET value = value + ? WHERE key='dropped'", (len(seqs),))
        return freed, seqs

    def pending(self, limit: int = 100, *, after_seq: int = 0) -> list[OutboxItem]:
        """Up to ``limit`` pending events with ``seq > after_seq``, oldest first."""
        with self._lock:
            try:
                rows = self._conn.execute(
                    "SELECT seq, topic, payload FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                    (after_seq, limit),
                ).fetchall()
            except sqlite3.Error as e:
                raise OutboxError(f"cannot read outbox {self.path}: {e}") from e
        return [OutboxItem(seq, topic, bytes(payload)) for seq, topic, payload in rows]

    def ack(self, seq: int) -> bool:
        """Delete the event ``seq`` (delivered). Idempotent; returns whether it was pending."""
        return self.ack_many([seq]) == 1

    def ack_many(self, seqs: Iterable[int]) -> int:
        """Delete delivered events in one transaction; returns how many were pending."""
        return self._delete(seqs, dropped=False)

    def drop(self, seqs: Iterable[int]) -> int:
        """Delete events that can never be delivered, counting them in :meth:`dropped` (in the
        same transaction); returns how many were pending."""
        return self._delete(seqs, dropped=True)

    def _delete(self, seqs: Iterable[int], *, dropped: bool) -> int:
        seqs = list(seqs)
        if not seqs:
            return 0
        with self._lock:
            try:
                with self._tx() as c:
                    freed = removed = 0
                    for seq in seqs:
                        row = c.execute("DELETE FROM events WHERE seq=? RETURNING size", (seq,)).fetchone()
                        if row is not None:
                            freed += row[0]
                            removed += 1
                    if dropped and removed:
                        c.execute("UPDATE meta SET value = value + ? WHERE key='dropped'", (removed,))
            except sqlite3.Error as e:
                raise OutboxError(f"cannot {'drop' if dropped else 'ack'} in outbox {self.path}: {e}") from e
            self._bytes -= freed
        return removed

    def depth(self) -> int:
        """Number of pending (not yet acknowledged) events."""
        return self._scalar("SELECT COUNT(*) FROM events")

    def pending_bytes(self) -> int:
        """Bytes (payload + topic) of the pending events, the quantity ``max_bytes`` bounds."""
        with self._lock:
            return self._bytes

    def dropped(self) -> int:
        """Events dropped to respect ``max_bytes``, or by :meth:`drop`, over the life of this
        file (persisted)."""
        return self._scalar("SELECT value FROM meta WHERE key='dropped'")

    def next_seq(self) -> int:
        """The ``seq`` the next append will get."""
        return self._scalar("SELECT value FROM meta WHERE key='next_seq'")

    def _scalar(self, sql: str) -> int:
        with self._lock:
            try:
                return int(self._conn.execute(sql).fetchone()[0])
            except sqlite3.Error as e:
                raise OutboxError(f"cannot read outbox {self.path}: {e}") from e

    def close(self) -> None:
        """Close the database. Idempotent."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# MQTT 5 PUBACK reason codes no re-send can change: Topic Name invalid, Packet too large,
# Payload format invalid. (Not authorized, quota exceeded and the like may be fixed meanwhile.)
# Caveat: Mosquitto 2.0 answers a publish over its message_size_limit with PUBACK 0x95, a code
# MQTT 5 does not allow in a PUBACK; paho-mqtt 2.2 takes that PUBACK for a malformed packet and
# closes the connection, so such a refusal never reaches on_publish (the event is re-sent at
# every reconnect). Keep events well under the broker's limits.
PERMANENT_REFUSALS = frozenset({0x90, 0x95, 0x99})


class OutboxPublisher:
    """Drains an :class:`Outbox` through a paho-mqtt 2.x client with QoS 1, in its own thread.

    The client is owned by the caller, who connects it and runs its network loop
    (``loop_start``, with ``reconnect_delay_set`` for automatic reconnects). :meth:`start`
    chains the publisher into the client's ``on_connect`` / ``on_disconnect`` / ``on_publish``
    callbacks (callbacks already set keep being called, before ours); :meth:`stop` restores
    them. Set the client's own callbacks before :meth:`start`.

    Protocol:

    * while connected, pending events are published in ``seq`` order, at most
      ``max_inflight`` unacknowledged at a time; an event in flight in the current connection
      is never published again;
    * an event is deleted from the outbox only when its PUBACK arrives (``on_publish``); the
      callback only records the message id and wakes the publisher thread, which matches ids to
      events and deletes them in one transaction — so ids can never be matched before they are
      known, and the network thread never waits on SQLite;
    * an event the broker refuses (an MQTT 5 PUBACK with a failure reason code, e.g. 0x87 Not
      authorized by its ACL) is not deleted: it is counted in :attr:`refused`, logged (at most
      once a minute) and published again on the next connection — the ACL may be fixed; but
      an event refused ``max_refusals`` times for a reason that no retry can change
      (:data:`PERMANENT_REFUSALS`: topic name invalid, packet too large, payload format
      invalid) is dropped from the outbox and counted in :meth:`Outbox.dropped`;
    * on every (re)connect, everything still pending is published again (paho's outgoing queue
      lives in memory and the previous connection's fate is unknown): receivers see duplicates
      and de-duplicate by ``seq``; nothing is lost.

    Callbacks never raise into paho's network thread. Errors in the publisher thread are logged
    (an outbox that cannot be written, e.g. on a full disk, at most once a minute) and retried
    after ``retry_interval`` seconds; acknowledged events that could not be deleted are deleted
    at a later step.
    """

    def __init__(
        self,
        outbox: Outbox,
        client: Any,
        *,
        max_inflight: int = 100,
        qos: int = 1,
        retry_interval: float = 1.0,
        max_refusals: int = 3,
    ) -> None:
        if max_inflight < 1:
            raise ValueError("max_inflight must be >= 1")
        if max_refusals < 1:
            raise ValueError("max_refusals must be >= 1")
        self._max_refusals = max_refusals
        self._permanent: dict[int, int] = {}  # seq -> permanent refusals so far (this process)
        self._outbox = outbox
        self._client = client
        self._max_inflight = max_inflight
        self._qos = qos
        self._retry = retry_interval
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards the fields shared with the callbacks below
        self._connected = False
        self._generation = 0  # bumped on every connect
        self._acked_mids: deque[int] = deque()
        self._refused_mids: deque[tuple[int, int, str]] = deque()  # (mid, code, reason) of negative PUBACKs
        self._idle = threading.Condition()
        self._is_idle = False
        self._saved: dict[str, Any] = {}
        # Publisher-thread state: mid -> seq of the current connection, and the highest seq sent.
        self._inflight: dict[int, int] = {}
        self._delivered: list[int] = []  # acknowledged seqs not deleted yet (delete failed)
        self._storage_errors = ThrottledLog(logger, 60.0)
        self._refusals = ThrottledLog(logger, 60.0)
        self._sent_up_to = 0
        self._seen_generation = -1
        self.published = 0  # publishes handed to paho (including re-publishes)
        self.acked = 0  # events deleted after PUBACK
        self.refused = 0  # negative PUBACKs of events (each refusal counted)

    # -- paho callbacks (network thread): record and wake, never raise ------------------------

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        try:
            ok = not getattr(reason_code, "is_failure", False)
            with self._lock:
                self._connected = ok
                if ok:
                    self._generation += 1
            self._wake.set()
        except Exception:  # pragma: no cover - defensive: never kill the network thread
            logger.exception("outbox publisher: on_connect failed")

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        try:
            with self._lock:
                self._connected = False
            self._wake.set()
        except Exception:  # pragma: no cover
            logger.exception("outbox publisher: on_disconnect failed")

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        try:
            with self._lock:
                if getattr(reason_code, "is_failure", False):
                    # MQTT 5 negative PUBACK (e.g. 0x87 Not authorized by the broker's ACL): not
                    # delivered. The publisher thread keeps the event if the mid is one of its own.
                    self._refused_mids.append((mid, int(getattr(reason_code, "value", 0x80)), str(reason_code)))
                else:
                    self._acked_mids.append(mid)
            self._wake.set()
        except Exception:  # pragma: no cover
            logger.exception("outbox publisher: on_publish failed")

    def _chain(self, name: str, ours: Callable[..., None]) -> Callable[..., None]:
        theirs = getattr(self._client, name)
        self._saved[name] = theirs
        if theirs is None:
            return ours

        def both(*args: Any) -> None:
            try:
                theirs(*args)  # the owner's first: e.g. its birth message before our backlog
            finally:
                ours(*args)

        return both

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Hook into the client's callbacks and start the publisher thread."""
        if self._thread is not None:
            raise RuntimeError("publisher already started")
        self._client.on_connect = self._chain("on_connect", self._on_connect)
        self._client.on_disconnect = self._chain("on_disconnect", self._on_disconnect)
        self._client.on_publish = self._chain("on_publish", self._on_publish)
        with self._lock:
            if self._client.is_connected():  # connected before start(): treat as a new connection
                self._connected = True
                self._generation += 1
        self._thread = threading.Thread(target=self._run, name="outbox-publisher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (events not yet acknowledged stay in the outbox) and unhook."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for name, cb in self._saved.items():
            setattr(self._client, name, cb)
        self._saved.clear()

    def wake(self) -> None:
        """Signal that new events were appended; cheap, callable from any thread."""
        with self._idle:
            # Not idle until the thread's next step has seen the new events: otherwise
            # wait_idle() right after an append returns on the previous step's stale verdict.
            self._is_idle = False
        self._wake.set()

    def wait_idle(self, timeout: float) -> bool:
        """Block until the outbox is empty and nothing is in flight; ``False`` on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._is_idle, timeout)

    # -- publisher thread --------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self._retry)
            self._wake.clear()
            if self._stopping.is_set():
                break
            try:
                self._step()
            except OutboxError as e:
                self._storage_errors.warning("outbox publisher: %s; retrying", e)
            except Exception:
                logger.exception("outbox publisher: drain step failed; retrying")
            else:
                self._storage_errors.resolved("outbox publisher: the outbox works again")

    def _step(self) -> None:
        with self._lock:
            connected, generation = self._connected, self._generation
            mids = list(self._acked_mids)
            self._acked_mids.clear()
            refused = list(self._refused_mids)
            self._refused_mids.clear()
        if generation != self._seen_generation:
            # A new connection: forget the old one's in-flight ids and start again from the
            # oldest pending event. PUBACKs for old ids (paho re-sends its own queue) no longer
            # match; the re-published copies will be acknowledged instead.
            self._seen_generation = generation
            self._inflight.clear()
            self._sent_up_to = 0
        self._delivered += [self._inflight.pop(mid) for mid in mids if mid in self._inflight]
        for mid, code, reason in refused:
            seq = self._inflight.pop(mid, None)
            if seq is None:
                continue  # another publisher's message, or an earlier connection's
            self.refused += 1
            if code in PERMANENT_REFUSALS:
                tries = self._permanent[seq] = self._permanent.get(seq, 0) + 1
                if tries >= self._max_refusals:
                    try:
                        self._outbox.drop([seq])
                    except OutboxError as e:  # kept: dropped at its next refusal
                        self._storage_errors.warning("outbox publisher: %s", e)
                        continue
                    del self._permanent[seq]
                    logger.warning("outbox publisher: the broker refused event seq %d %d times (%s); "
                                   "dropped it: sending it again cannot succeed", seq, tries, reason)
                    continue
            # Kept: no longer in flight, and published again from the oldest pending event on
            # the next connection (the broker would refuse it again on this one).
            self._refusals.warning("outbox publisher: the broker refused event seq %d (%s); it "
                                   "stays in the outbox (check the broker's ACL for this agent)",
                                   seq, reason)
        if self._delivered:
            self.acked += self._outbox.ack_many(self._delivered)  # raises: kept for the next step
            self._delivered.clear()
        if connected:
            self._publish_more(generation)
        idle = not self._inflight and self._outbox.depth() == 0
        with self._idle:
            self._is_idle = idle
            if idle:
                self._idle.notify_all()

    def _publish_more(self, generation: int) -> None:
        room = self._max_inflight - len(self._inflight)
        if room <= 0:
            return
        for item in self._outbox.pending(room, after_seq=self._sent_up_to):
            with self._lock:
                if self._generation != generation or not self._connected:
                    return  # the connection changed under us: the next step starts over
            info = self._client.publish(item.topic, item.payload, qos=self._qos)
            if info.rc != 0:
                # Not connected any more (on_connect wakes us) or paho's queue is full (retried
                # after retry_interval); either way the event is still pending.
                logger.debug("outbox publisher: publish of seq %d returned rc %s", item.seq, info.rc)
                return
            self._inflight[info.mid] = item.seq
            self._sent_up_to = item.seq
            self.published += 1
