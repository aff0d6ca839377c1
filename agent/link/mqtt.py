"""The agent's MQTT link: one paho-mqtt 2.x connection kept alive, fed from the Outbox, never blocking callers.

- MQTT 5 by default (3.1.1 selectable), TLS (CA, client certificate, insecure switch), username/password.
- Last Will on the status topic (retained, QoS 1, "offline"); after every (re)connect the `online` status is
  published (retained) and every subscription is renewed, then the on-connect callbacks run.
- A refused CONNACK (bad credentials, not authorized…) is a failure: logged with its reason code, never
  reported as connected; the link keeps retrying with backoff in case the broker is fixed.
- Reconnect: our own loop around a fresh paho client per attempt, waiting a random delay in
  [reconnect_min_s, min(reconnect_max_s, reconnect_min_s * 2**attempt)] (exponential backoff with full
  jitter, so a fleet does not reconnect in lock-step after a broker restart). paho's built-in
  `reconnect_delay_set` has no jitter, and a fresh client per connection means paho never replays its own
  queue, so the Outbox is the single source of truth for what still has to be sent.
- A sender thread drains the Outbox in order with a bounded number of unacknowledged publishes; a message
  leaves the Outbox only when the broker acknowledged it (PUBACK for QoS >= 1). After a lost connection the
  unacknowledged ones are sent again, oldest first (at-least-once: consumers may see a duplicate `seq`).
- Batching (opt-in per topic, `batches={topic: n}`): consecutive queued messages of that topic leave as one
  publish whose payload is a JSON array of their payloads (each a JSON document), up to n per publish; every
  publish on that topic is an array, even of one. It costs no latency (only what is already queued is joined)
  and removes the per-message cost of paho and the PUBACK path at high rates.
- `feed` (optional) runs on the sender thread at the start of every round, connected or not: the agent's
  PredictionStream encodes the predictions its camera loops staged and puts them into the Outbox there.
- Subscription handlers and on-connect callbacks run on a worker thread, not on paho's network thread.
- A subscription the broker refuses (a failure code in the SUBACK) is logged and asked for again with backoff.
"""

from __future__ import annotations

import logging
import queue
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as paho
from paho.mqtt.client import MQTTMessage
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgecv.agent.contract.topics import DeviceTopics
from edgecv.agent.errors import MqttError
from edgecv.agent.link.outbox import Message, Outbox
from edgecv.agent.link.protocol import REFUSED, Handler, message_problem

if TYPE_CHECKING:
    from edgecv.agent.config import BrokerConfig

log = logging.getLogger(__name__)

# CONNACK reason code of a broker that does not speak the requested MQTT version (3.1.1's return code 1 maps to it)
UNSUPPORTED_PROTOCOL_VERSION = 132

CONNACK_TIMEOUT_S = 10.0
COALESCE_S = 0.005  # at most one round of sending per 5 ms while messages come faster than that
# ... and per 20 ms once a round carries this many messages (a stream above ~1,600 per second; it stays in this mode
# down to ~400 per second). A round costs ~0.1 ms of CPU whatever it carries (sender and paho wake-ups, thread
# switches, caches refilled after inference): at 200 rounds per second that was 4-6 % of the throughput of a
# 64x64 model on one core (docs/BENCHMARKS.md). 20 ms is latency no consumer of such a stream notices; a camera-rate
# stream (one message per round) keeps the 5 ms rounds.
FLOOD_MESSAGES, FLOOD_COALESCE_S = 8, 0.02
SUBSCRIBE_RETRY_MAX_S = 30.0  # a refused subscription is asked for again after 1, 2, 4 ... at most this many s
# A message that was alone in flight when the broker dropped the connection this many times in a row is given up
# on (quarantined: dropped and counted as undeliverable) instead of being sent first after every reconnect for ever.
QUARANTINE_AFTER = 3


def send_without_delay(client: paho.Client) -> None:
    """Turn off Nagle's algorithm on a connected client's socket (paho leaves it on).

    With it on, a small publish written right after another small write (the PUBACK of the message that asked
    for it) waits for the broker's delayed ACK, ~40 ms on Linux: every command result and every request/response
    exchange took 45-100 ms on loopback. The sender already coalesces messages into rounds, so the segments
    Nagle would merge are few."""
    sock = client.socket()
    if isinstance(sock, socket.socket):  # ssl.SSLSocket too; not a websocket wrapper
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:  # a socket type without TCP options: keep the default
            log.debug("TCP_NODELAY not set: %s", exc)


@dataclass
class _SenderState:
    """What the sender thread keeps between rounds (only that thread touches it)."""

    inflight: dict[int, list[int]] = field(default_factory=dict)  # paho mid -> outbox ids, current connection only
    gen: int = -1  # the connection generation `inflight` belongs to
    sent: int = 0  # the last round: messages, publishes, whether it emptied the outbox
    publishes: int = 0
    drained: bool = False
    careful_until: int = -1  # >= 0: send one at a time until the messages up to this id went through
    strikes: dict[int, int] = field(default_factory=dict)  # outbox id -> connections lost with it alone in flight


@dataclass
class _Subscription:
    filter: str
    handler: Handler
    qos: int


class Backoff:
    """Exponential backoff with full jitter: attempt n waits uniform(min, min(max, min * 2**n))."""

    def __init__(self, min_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self.min_s = max(0.0, min_s)
        self.max_s = max(self.min_s, max_s)
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.max_s, self.min_s * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return self._rng.uniform(self.min_s, max(self.min_s, ceiling))

    def reset(self) -> None:
        self.attempt = 0


class MqttLink:
    """A self-healing MQTT connection for one device (see the module docstring for the guarantees)."""

    def __init__(self, cfg: BrokerConfig, topics: DeviceTopics, *, will: bytes | Callable[[], bytes], outbox: Outbox,
                 online: Callable[[], bytes] | None = None, max_inflight: int = 100,
                 batches: Mapping[str, int] | None = None, feed: Callable[[], object] | None = None) -> None:
        self.cfg = cfg
        self.feed = feed  # run on the sender thread before every round, connected or not (PredictionStream.drain)
        self.batches = {topic: n for topic, n in (batches or {}).items() if n > 1}
        self.topics = topics
        self.outbox = outbox
        self.will = will
        self.online_payload = online
        self.max_inflight = max(1, max_inflight)
        self.connected = threading.Event()
        self.last_error: str | None = None
        self.connects = 0  # successful connections so far
        self.refused = 0  # CONNACKs with a failure reason code
        self.suback_refusals = 0  # subscriptions the broker refused (each is asked for again)
        self._v5 = str(cfg.protocol) != "3.1.1"
        self._stop = threading.Event()
        self._sender_stop = threading.Event()
        self._wake = threading.Event()
        outbox.add_listener(self._wake)
        self._lock = threading.Lock()
        self._client: paho.Client | None = None
        self._generation = 0
        self._session_ended = threading.Event()
        self._acks: queue.SimpleQueue[tuple[int, int, bool]] = queue.SimpleQueue()
        self._subs: list[_Subscription] = []
        self._on_connect: list[Callable[[], None]] = []
        self._work: queue.Queue[tuple[Callable[..., None], tuple[Any, ...]] | None] = queue.Queue(maxsize=10000)
        self._threads: list[threading.Thread] = []
        self._warned: dict[str, float] = {}
        self._expiry_warned = False
        self._suback_lock = threading.Lock()
        # (generation, mid) -> (subscription, attempt) until its SUBACK arrives
        self._suback_pending: dict[tuple[int, int], tuple[_Subscription, int]] = {}

    # ----------------------------------------------------------------------------------------- public API
    def start(self) -> MqttLink:
        for name, target in (("mqtt-link", self._supervise), ("mqtt-sender", self._send_loop),
                             ("mqtt-worker", self._work_loop)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def is_connected(self) -> bool:
        return self.connected.is_set()

    @property
    def threads(self) -> list[threading.Thread]:
        """The link's long-lived threads (connection supervisor, sender, handler worker), for supervision."""
        return list(self._threads)

    def wait_connected(self, timeout: float) -> None:
        """Block until connected; raise MqttError naming the last failure (e.g. a refused CONNACK) otherwise."""
        if not self.connected.wait(timeout):
            advice = "" if "broker.protocol" in (self.last_error or "") else "; check broker.host/port and credentials"
            raise MqttError(f"Could not connect to the MQTT broker {self.cfg.host}:{self.cfg.port} within "
                            f"{timeout:g} s: {self.last_error or 'no answer'}{advice}")

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, expiry_s: int = 0) -> int:
        """Queue a message for delivery (never blocks); returns its outbox id, or REFUSED (0) for a message no
        broker would accept (`message_problem`): that one is counted as undeliverable and logged, never raised."""
        problem = message_problem(topic, payload)
        if problem is not None:
            self.outbox.refuse()
            self._warn("refused", "Refused to publish a message: %s; counted as undeliverable", problem)
            return REFUSED
        return self.outbox.put(topic, payload, qos=qos, retain=retain, expiry_s=expiry_s)

    def subscribe(self, filter: str, handler: Handler, qos: int = 1) -> None:
        """Subscribe now if connected and again after every reconnect; `handler(topic, payload)` runs on the
        link's worker thread."""
        sub = _Subscription(filter, handler, qos)
        with self._lock:
            self._subs.append(sub)
            client = self._client if self.connected.is_set() else None
            gen = self._generation
        if client is not None:
            self._subscribe_on(client, gen, sub)

    def add_on_connect(self, callback: Callable[[], None]) -> None:
        """`callback()` runs on the worker thread after every (re)connect, once `online` was published."""
        with self._lock:
            self._on_connect.append(callback)

    def stop(self, final_status: bytes | None = None, flush_timeout: float = 3.0) -> None:
        """Flush the outbox (up to `flush_timeout`), publish `final_status` retained on the status topic, then
        disconnect cleanly so the broker does not send the Last Will."""
        if self._stop.is_set():
            return
        if self.connected.is_set() and flush_timeout > 0:
            deadline = time.monotonic() + flush_timeout
            while time.monotonic() < deadline and len(self.outbox) and self.connected.is_set():
                self.outbox.wait_empty(min(0.1, max(0.0, deadline - time.monotonic())))
        self._sender_stop.set()
        self._wake.set()
        with self._lock:
            client = self._client if self.connected.is_set() else None
        if client is not None and final_status is not None:
            info = client.publish(self.topics.status, final_status, qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=max(1.0, flush_timeout))
            except (RuntimeError, ValueError) as exc:
                log.warning("Final status was not acknowledged: %s", exc)
        self._stop.set()
        if client is not None:
            client.disconnect()  # a normal DISCONNECT: the broker discards the Last Will
        self._session_ended.set()
        for thread in self._threads:
            if thread.name != "mqtt-worker":
                thread.join(timeout=5)
        self._work.put(None)
        for thread in self._threads:
            if thread.name == "mqtt-worker" and thread is not threading.current_thread():
                thread.join(timeout=5)
        self.connected.clear()
        self.outbox.close()

    # ------------------------------------------------------------------------------------ connection loop
    def _new_client(self) -> paho.Client:
        cfg = self.cfg
        client_id = cfg.client_id or f"edgecv-{self.topics.device}-{uuid.uuid4().hex[:6]}"
        if self._v5:
            client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                 protocol=MQTTProtocolVersion.MQTTv5, reconnect_on_failure=False)
        else:
            client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True,
                                 protocol=MQTTProtocolVersion.MQTTv311, reconnect_on_failure=False)
        client.max_inflight_messages_set(self.max_inflight)
        client.max_queued_messages_set(0)
        will = self.will() if callable(self.will) else self.will
        client.will_set(self.topics.status, will, qos=1, retain=True)
        if cfg.username:
            client.username_pw_set(cfg.username, cfg.resolve_password())
        tls = cfg.tls
        if tls.enabled:
            client.tls_set(ca_certs=tls.ca_file or None, certfile=tls.cert_file or None,
                           keyfile=tls.key_file or None)
            if tls.insecure:
                client.tls_insecure_set(True)
        client.on_connect = self._on_connect_cb
        client.on_disconnect = self._on_disconnect_cb
        client.on_publish = self._on_publish_cb
        client.on_message = self._on_message_cb
        client.on_subscribe = self._on_subscribe_cb
        return client

    def _supervise(self) -> None:
        backoff = Backoff(self.cfg.reconnect_min_s, self.cfg.reconnect_max_s)
        while not self._stop.is_set():
            client = self._new_client()
            with self._lock:
                self._generation += 1
                client.user_data_set(self._generation)
                self._client = client
                self._session_ended.clear()
            connected_at = None
            refused_before = self.refused
            try:
                if self._v5:
                    client.connect(self.cfg.host, int(self.cfg.port), keepalive=int(self.cfg.keepalive),
                                   clean_start=True)
                else:
                    client.connect(self.cfg.host, int(self.cfg.port), keepalive=int(self.cfg.keepalive))
            except (OSError, ValueError) as exc:
                self._fail(f"cannot reach {self.cfg.host}:{self.cfg.port}: {exc}")
            else:
                client.loop_start()
                deadline = time.monotonic() + CONNACK_TIMEOUT_S
                while not self._session_ended.wait(0.2):
                    if self.connected.is_set():
                        connected_at = connected_at or time.monotonic()
                    elif time.monotonic() > deadline:
                        self._fail(f"no CONNACK from the broker within {CONNACK_TIMEOUT_S:g} s")
                        break
                if self.connected.is_set() or connected_at is not None:
                    connected_at = connected_at or time.monotonic()
                elif self._session_ended.is_set() and self.refused == refused_before and not self._stop.is_set():
                    self._fail(self._closed_before_connack())
                self._lost()
                if not self._stop.is_set():
                    client.disconnect()
                client.loop_stop()
            if self._stop.is_set():
                break
            if connected_at is not None and time.monotonic() - connected_at > 5.0:
                backoff.reset()
            delay = backoff.next_delay()
            log.info("Reconnecting to %s:%s in %.2f s", self.cfg.host, self.cfg.port, delay)
            self._stop.wait(delay)

    def _closed_before_connack(self) -> str:
        detail = self.last_error if (self.last_error or "").startswith("disconnected") else "no reason given"
        reason = f"the broker closed the connection without accepting it ({detail}); check the broker's log"
        if "." in self.topics.base:
            # NATS's MQTT gateway drops a client whose Will topic contains '.' (it maps '.' to its own separator)
            reason += "; NATS refuses topics containing '.', as in this device id or prefix: use '-' or '_'"
        return reason

    def _fail(self, reason: str) -> None:
        self.last_error = reason
        self._warn("connect", "MQTT connection failed: %s", reason)

    def _lost(self) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        with self._lock:
            self._generation += 1  # late PUBACKs of the old connection are ignored
        self.outbox.rewind()
        self._wake.set()
        if was and not self._stop.is_set():
            log.warning("MQTT connection to %s:%s lost; buffering predictions", self.cfg.host, self.cfg.port)

    # ------------------------------------------------------------------------------- paho callbacks (network)
    def _on_connect_cb(self, client: paho.Client, gen: int, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self.refused += 1
            name = getattr(reason, "getName", lambda: str(reason))()
            hint = ""
            if reason.value == UNSUPPORTED_PROTOCOL_VERSION and self._v5:
                hint = '; this broker does not speak MQTT 5 (NATS speaks 3.1.1): set broker.protocol = "3.1.1"'
            self._fail(f"broker refused the connection: {name} (reason code {reason.value}){hint}")
            self._session_ended.set()
            return
        send_without_delay(client)
        with self._lock:
            subs = list(self._subs)
            callbacks = list(self._on_connect)
        if self.online_payload is not None:
            client.publish(self.topics.status, self.online_payload(), qos=1, retain=True)
        with self._suback_lock:
            self._suback_pending.clear()  # what an earlier connection still waited for
        for sub in subs:
            self._subscribe_on(client, gen, sub)
        self.connects += 1
        self.last_error = None
        self.connected.set()
        self._wake.set()
        log.info("Connected to MQTT broker %s:%s (MQTT %s%s)", self.cfg.host, self.cfg.port,
                 "5" if self._v5 else "3.1.1", ", TLS" if self.cfg.tls.enabled else "")
        for callback in callbacks:
            self._submit(callback)

    def _subscribe_on(self, client: paho.Client, gen: int, sub: _Subscription, attempt: int = 0) -> None:
        with self._suback_lock:  # recorded before its SUBACK can be handled
            rc, mid = client.subscribe(sub.filter, qos=sub.qos)
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                self._suback_pending[(gen, mid)] = (sub, attempt)

    def _on_subscribe_cb(self, client: paho.Client, gen: int, mid: int, reasons: Any, properties: Any) -> None:
        with self._suback_lock:
            pending = self._suback_pending.pop((gen, mid), None)
        failed = [r for r in reasons or () if getattr(r, "is_failure", False)]
        if pending is None or not failed or self._stop.is_set():
            return
        # A broker may refuse a subscription for a while (NATS's MQTT gateway does when creating the JetStream
        # consumer behind a QoS 1 subscription times out on a busy cluster): ask again with backoff instead of
        # staying deaf to pushes or commands until the next reconnect.
        sub, attempt = pending
        self.suback_refusals += 1
        delay = min(SUBSCRIBE_RETRY_MAX_S, 2.0 ** attempt)
        self._warn(f"suback-{sub.filter}", "Broker refused the subscription to %s (%s); asking again in %.0f s",
                   sub.filter, getattr(failed[0], "getName", lambda: str(failed[0]))(), delay)
        timer = threading.Timer(delay, self._resubscribe, (gen, sub, attempt + 1))
        timer.daemon = True
        timer.start()

    def _resubscribe(self, gen: int, sub: _Subscription, attempt: int) -> None:
        with self._lock:
            client = self._client if self._generation == gen and self.connected.is_set() else None
        if client is not None and not self._stop.is_set():  # else the next connection subscribes afresh
            self._subscribe_on(client, gen, sub, attempt)

    def _on_disconnect_cb(self, client: paho.Client, gen: int, flags: Any, reason: Any, properties: Any) -> None:
        refused = (self.last_error or "").startswith("broker refused")  # keep the CONNACK reason, it says more
        if getattr(reason, "is_failure", False) and not self._stop.is_set() and not refused:
            self.last_error = f"disconnected: {reason}"
        self._session_ended.set()

    def _on_publish_cb(self, client: paho.Client, gen: int, mid: int, reason: Any, properties: Any) -> None:
        # Called with paho's internal lock held: only hand the ack to the sender thread, which polls for acks
        # while publishes are in flight (no wake-up per PUBACK).
        self._acks.put((gen, mid, bool(getattr(reason, "is_failure", False))))

    def _on_message_cb(self, client: paho.Client, gen: int, message: MQTTMessage) -> None:
        with self._lock:
            subs = list(self._subs)
        for sub in subs:
            if paho.topic_matches_sub(sub.filter, message.topic):
                self._submit(sub.handler, message.topic, bytes(message.payload))

    def _submit(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self._work.put_nowait((fn, args))
        except queue.Full:
            self._warn("work-full", "MQTT handler queue is full; dropping an incoming message")

    # ----------------------------------------------------------------------------------------- threads
    def _work_loop(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            fn, args = item
            try:
                fn(*args)
            except Exception:
                log.exception("MQTT handler %s failed", getattr(fn, "__qualname__", fn))

    def _send_loop(self) -> None:
        state = _SenderState()
        while not self._sender_stop.is_set():
            try:
                self._send_round(state)
            except Exception:  # a bug in a round must not end publishing: log it and go on with the next round
                state.sent = 0
                self._warn("sender", "MQTT sender round failed; continuing", exc_info=True)
                self._sender_stop.wait(0.1)

    def _send_round(self, st: _SenderState) -> None:
        if st.sent:
            # The last round sent something: let messages accumulate for COALESCE_S before the next round.
            # Puts during this sleep only set the event (no thread wakes), so at high rates a round costs one
            # wake-up and sends everything queued as one batch; a message arriving after a quiet spell still
            # goes out at once.
            # The long pause only after a round that emptied the outbox using at most half the in-flight window:
            # then the window cannot be what limits the rate. A round cut short by the window comes back after
            # COALESCE_S.
            flood = st.sent >= FLOOD_MESSAGES and st.drained and 2 * st.publishes <= self.max_inflight
            time.sleep(FLOOD_COALESCE_S if flood else COALESCE_S)
        else:
            # PUBACKs do not wake this thread (one wake-up fewer per publish): while publishes are in flight
            # it polls for their acknowledgements every COALESCE_S.
            self._wake.wait(COALESCE_S if st.inflight else 0.5)
        self._wake.clear()
        st.sent, st.publishes, st.drained = 0, 0, False
        if self.feed is not None:
            try:
                self.feed()
            except Exception:
                log.exception("Moving staged messages into the outbox failed")
        # Acknowledgements first, so a PUBACK that arrived just before a connection was lost still counts.
        while True:
            try:
                agen, mid, failed = self._acks.get_nowait()
            except queue.Empty:
                break
            msg_ids = st.inflight.pop(mid, None) if agen == st.gen else None
            if msg_ids is not None:
                if failed:
                    self._warn("puback", "Broker refused a publish (PUBACK failure code); dropped, counted as "
                               "undeliverable")
                    self.outbox.discard(msg_ids)
                else:
                    self.outbox.ack_all(msg_ids)
        with self._lock:
            client, current = self._client, self._generation
        if current != st.gen:
            # A new connection (or a lost one): everything not acknowledged is due again, oldest first.
            self._connection_changed(st)
            st.gen = current
            self.outbox.rewind()
        if client is None or not self.connected.is_set():
            return
        # After a connection was lost with publishes in flight, those are sent again one at a time: if one of them
        # is what makes the broker drop the connection, it is then the only one in flight when that happens again.
        careful = st.careful_until >= 0
        window = 1 if careful else self.max_inflight
        while len(st.inflight) < window:
            run = self.outbox.take_run({} if careful else self.batches)
            if not run:
                st.drained = True
                if careful:
                    st.careful_until = -1  # everything that was in flight at the loss went through
                break
            if careful and run[0].id > st.careful_until:
                st.careful_until = -1
                self.outbox.unget(run)  # hand it out again in the normal way (a batch) next round
                st.sent = max(st.sent, 1)
                break
            if not self._send(client, run, st.inflight):
                break
            st.sent += len(run)
            st.publishes += 1

    def _connection_changed(self, st: _SenderState) -> None:
        """The connection the sender used is gone (or a new one is up): judge what was left in flight on it."""
        if not st.inflight:
            return
        held = [i for ids in st.inflight.values() for i in ids]
        log.debug("Connection changed with %d publish(es) in flight (ids %d-%d; careful until %d)", len(st.inflight),
                  min(held), max(held), st.careful_until)
        if st.careful_until >= 0 and len(st.inflight) == 1:
            # The connection died with this one message in flight, alone: a strike against it. A message that takes
            # the connection down QUARANTINE_AFTER times in a row is given up on, instead of blocking every message
            # queued behind it for ever.
            strikes = [st.strikes.get(i, 0) + 1 for i in held]
            if max(strikes) >= QUARANTINE_AFTER:
                for i in held:
                    st.strikes.pop(i, None)
                peek = self.outbox.peek(held[0])
                if self.outbox.discard(held):
                    self._warn("quarantine", "The broker dropped the connection %d times right after receiving the "
                               "message on %s (%s bytes); it is dropped, counted as undeliverable", QUARANTINE_AFTER,
                               peek[0] if peek else "?", peek[1] if peek else "?")
            else:
                st.strikes.update(zip(held, strikes, strict=True))
        if len(st.strikes) > 1000:  # ids long gone (acknowledged); keep the map small
            st.strikes.clear()
        st.careful_until = max(st.careful_until, max(held))
        st.inflight.clear()

    def _send(self, client: paho.Client, run: list[Message], inflight: dict[int, list[int]]) -> bool:
        """One publish for `run` (one message, or a batch for a topic in `batches`); False if not connected.

        A message paho refuses (it raises: an invalid topic or size that slipped past publish()) is dropped and
        counted as undeliverable: it would fail the same way every time."""
        msg = run[0]
        ids = [m.id for m in run]
        try:
            props = None
            if msg.expiry_s > 0:
                if self._v5:
                    props = Properties(PacketTypes.PUBLISH)
                    props.MessageExpiryInterval = msg.expiry_s
                elif not self._expiry_warned:
                    self._expiry_warned = True
                    log.warning("publish.expiry_s = %d has no effect with broker.protocol = \"3.1.1\": MQTT 3.1.1 has "
                                "no message expiry, so the broker keeps messages for offline subscribers until they "
                                "are delivered; use MQTT 5 where the broker supports it", msg.expiry_s)
            payload = b"[" + b",".join(m.payload for m in run) + b"]" if msg.topic in self.batches else msg.payload
            info = client.publish(msg.topic, payload, qos=msg.qos, retain=msg.retain, properties=props)
        except Exception as exc:
            self.outbox.discard(ids)
            self._warn("unsendable", "Cannot publish on %r (%s: %s); dropped, counted as undeliverable",
                       msg.topic[:200], type(exc).__name__, exc)
            return True
        if info.rc in (MQTTErrorCode.MQTT_ERR_NO_CONN, MQTTErrorCode.MQTT_ERR_CONN_LOST,
                       MQTTErrorCode.MQTT_ERR_QUEUE_SIZE):
            # Not connected any more: the messages stay in the outbox and are sent again after reconnecting.
            self.outbox.rewind()
            return False
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self.outbox.discard(ids)
            self._warn("unsendable", "Cannot publish on %r (%s); dropped, counted as undeliverable", msg.topic[:200],
                       paho.error_string(info.rc))
            return True
        if msg.qos == 0:
            self.outbox.ack_all(ids)
        else:
            inflight[info.mid] = ids
        return True

    def _warn(self, key: str, fmt: str, *args: Any, exc_info: bool = False) -> None:
        """Log a warning at most every 10 s per kind."""
        now = time.monotonic()
        if now - self._warned.get(key, -1e9) >= 10.0:
            self._warned[key] = now
            log.warning(fmt, *args, exc_info=exc_info)
        else:
            log.debug(fmt, *args, exc_info=exc_info)
