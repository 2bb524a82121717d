"""The ThingsBoard uplink: one MQTT session at a time, the outbox drained through it.

`Uplink.run` keeps a session with ThingsBoard's MQTT Gateway API up until it
is cancelled. Each session subscribes to the three gateway topics, announces
every device (``v1/gateway/connect``) before any of its telemetry, asks for
their shared attributes, and then runs three tasks in one TaskGroup:

- drain: peek the outbox, pack rows into telemetry messages of at most
  ``max_payload_bytes``, keep up to ``window`` of them in flight, and delete
  rows only when their PUBACK arrives (aiomqtt's ``publish(qos=1)`` returns
  only then: paho marks a QoS 1 message published in ``_do_on_publish``, on
  PUBACK). After a reconnect it starts again from the first row still in the
  outbox, so a dropped connection loses nothing and reorders nothing;
- receive: attribute updates and responses go to the handler, RPCs are
  answered; anything malformed is logged and counted, never raised;
- health: the gateway's own telemetry every ``health_interval`` seconds.

Nothing the server sends can end the uplink, let alone the daemon: every
message is handled on its own, a message that cannot be understood is
dropped and counted, an RPC that can be addressed (a valid device name and
id) is always answered, and any exception a handler raises is caught,
counted and logged once per kind (`gateway.faults`). Replies are kept within
``max_payload_bytes`` (`tbmsg.fit_rpc_reply`).

When the broker goes away the session ends and the uplink reconnects
(`RetryPolicy`): as long as what fails is the network or the broker (refused,
reset, timed out), attempts stay at most about a second apart, however long
the outage and however often the link flaps, so delivery resumes within
about a second of every return; only failures a retry cannot fix (the
broker refusing our credentials, a host name that does not resolve) back off
to a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiomqtt

from gateway import tbmsg
from gateway.clock import Clock, SystemClock
from gateway.config import ThingsBoardConfig
from gateway.faults import FaultLog, clip, quote
from gateway.reconnect import PATIENT_MAX_S, RetryPolicy, patience_reason
from gateway.service import fields
from gateway.store import Store
from gateway.tbmsg import InvalidMessage, MalformedMessage, MalformedRpc, OutboxRow

log = logging.getLogger("hydrogate.uplink")

#: Telemetry messages in flight (published, PUBACK pending) at once.
WINDOW = 16
#: One outbox read covers about this many full messages.
PEEK_MESSAGES = 16
#: ...and at most this many rows.
PEEK_ROWS = 20_000
#: Longest wait for a PUBACK before the session is given up.
ACK_TIMEOUT_S = 30.0
#: Longest wait for CONNACK and SUBACK. aiomqtt ignores a connection closed
#: before CONNACK and waits this long, so it must be short.
CONNECT_TIMEOUT_S = 3.0
#: A session that lasted this long was healthy: its loss starts retries from the shortest delay
#: (a broker that closes every session at once is not retried more than once a second).
HEALTHY_S = 5.0
#: Longest the uplink spends sending disconnects when it is stopped.
GOODBYE_S = 2.0
#: Attribute request ids wrap here (the server reads them as a 32-bit int).
MAX_REQUEST_ID = 2**31 - 1


class UplinkHandler(Protocol):
    """What the daemon provides to answer the server."""

    def on_attributes(
        self, device: str, data: Mapping[str, Any], *, response: bool = False
    ) -> None:
        """Shared attributes of ``device`` changed (``response``: or arrived in a response).

        ``data`` is as the server sent it: key -> value, and for deletions a
        ``"deleted"`` key listing the removed keys.
        """

    async def on_rpc(self, device: str, method: str, params: Any) -> dict[str, Any]:
        """Carry out a server-side RPC; returns the reply's ``data``."""
        ...

    def shared_attribute_keys(self, device: str) -> list[str]:
        """The shared attributes to request for ``device`` at each session start."""
        ...


@dataclass
class UplinkStats:
    """Counters of the uplink (kept across sessions)."""

    published: int = 0  # messages acknowledged by the broker
    reconnects: int = 0  # sessions established after the first
    attempts: int = 0  # connection attempts (successful or not)
    malformed: int = 0  # incoming messages that could not be understood
    handler_errors: int = 0  # exceptions raised while handling an incoming message
    rpc: int = 0  # RPCs answered
    rpc_trimmed: int = 0  # replies trimmed to fit max_payload_bytes
    rpc_refused: int = 0  # replies replaced by an error (too large, not JSON)
    last_error: str | None = None
    last_outage_s: float | None = None  # how long the last outage lasted


@dataclass
class _Session:
    """The state of one MQTT session."""

    client: aiomqtt.Client
    started: float
    announced: set[str] = field(default_factory=set)
    requests: dict[int, tuple[str, list[str]]] = field(default_factory=dict)
    inflight_rows: int = 0
    attributes_sent: dict[str, bytes] = field(default_factory=dict)


class Uplink:
    """Keeps the ThingsBoard session up and forwards the store's outbox through it."""

    def __init__(
        self,
        config: ThingsBoardConfig,
        *,
        gateway_name: str,
        store: Store,
        handler: UplinkHandler,
        devices: Callable[[], Sequence[str]],
        health_interval: float = 60.0,
        health_extra: Callable[[], Mapping[str, Any]] | None = None,
        window: int = WINDOW,
        clock: Clock | None = None,
        faults: FaultLog | None = None,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.config = config
        self.gateway_name = gateway_name
        self.stats = UplinkStats()
        self._store = store
        self._handler = handler
        self._devices = devices
        self._health_interval = health_interval
        self._health_extra = health_extra
        self._window = window
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._limit = tbmsg.payload_limit(config.max_payload_bytes)
        self._rpc_limit = tbmsg.payload_limit(config.max_payload_bytes, tbmsg.RPC)
        self._attr_limit = tbmsg.payload_limit(config.max_payload_bytes, tbmsg.ATTRIBUTES)
        # Client attributes per device (what is in force): the latest only, published at
        # every session start and whenever they change.
        self._attributes: dict[str, bytes] = {}
        self._attributes_changed = asyncio.Event()
        #: Faults of server input, by kind; shared with the daemon's when it passes one.
        self.faults = faults if faults is not None else FaultLog(log)
        self._started = self._clock.monotonic()
        self._session: _Session | None = None
        self._sessions = 0
        self._connected_at: float | None = None  # when the current attempt got its session
        self._down_since: float | None = None  # start of the current outage
        self._stopping = False
        self._patience: str | None = None  # why the last failed attempt is not retried soon
        self._request_ids = itertools.cycle(range(1, MAX_REQUEST_ID + 1))

    @property
    def connected(self) -> bool:
        """True while a session is established."""
        return self._session is not None

    def in_state_s(self) -> float:
        """Seconds since the session came up (when connected) or since the outage began."""
        since = self._connected_at if self._session is not None else self._down_since
        return max(0.0, self._clock.monotonic() - (self._started if since is None else since))

    def set_client_attributes(self, device: str, values: Mapping[str, Any]) -> None:
        """Publish ``values`` as ``device``'s client attributes (now, or when connected).

        Only the latest values of a device are kept: a change while
        disconnected is published at the next session start. Values that
        cannot be sent (invalid, over ``max_payload_bytes``) are logged and
        dropped, never stored.
        """
        try:
            payload = tbmsg.client_attributes(device, values, self._attr_limit)
        except InvalidMessage as exc:
            log.warning("client attributes of %s not published: %s", device, exc,
                        extra=fields(node=device))
            return
        if self._attributes.get(device) != payload:
            self._attributes[device] = payload
            self._attributes_changed.set()

    def forget_client_attributes(self, device: str) -> None:
        """``device`` left: its client attributes are no longer published."""
        self._attributes.pop(device, None)

    async def _publish_attributes(self, session: _Session) -> None:
        """Publish every device's client attributes not sent yet in this session."""
        while True:
            self._attributes_changed.clear()
            for device, payload in list(self._attributes.items()):
                if session.attributes_sent.get(device) == payload:
                    continue
                await self._announce(session, [device])
                await self._publish(session.client, tbmsg.ATTRIBUTES, payload)
                session.attributes_sent[device] = payload
            await self._attributes_changed.wait()

    # ------------------------------------------------------------- reconnects
    async def run(self) -> None:
        """Keep a session up until cancelled (then say goodbye to every device)."""
        retry = RetryPolicy()
        while True:
            attempt_start = self._clock.monotonic()
            self.stats.attempts += 1
            error = await self._attempt()
            now = self._clock.monotonic()
            self.stats.last_error = f"{type(error).__name__}: {error}"
            patience = patience_reason(error)
            if self._connected_at is not None:  # this attempt had a session: it is gone now
                lasted = now - self._connected_at
                self._down_since = now
                log.warning(
                    "ThingsBoard session lost after %.1f s: %s", lasted, error, extra=self._fields
                )
                if lasted >= HEALTHY_S:
                    retry.connected()
            elif self._down_since is None or patience != self._patience:
                self._down_since = self._down_since or attempt_start
                log.warning(
                    "cannot reach ThingsBoard at %s:%s: %s (%s)",
                    self.config.host,
                    self.config.port,
                    error,
                    f"{patience}: retrying up to every {PATIENT_MAX_S:g} s"
                    if patience
                    else "retrying every second",
                    extra=self._fields,
                )
            else:
                log.debug("ThingsBoard still unreachable: %s", error)
            self._patience = patience
            await asyncio.sleep(retry.delay(error))

    @property
    def _fields(self) -> dict[str, Any]:
        return fields(host=self.config.host, gateway=self.gateway_name)

    def _client(self) -> aiomqtt.Client:
        cfg = self.config
        tls = aiomqtt.TLSParameters(ca_certs=str(cfg.ca_file) if cfg.ca_file else None)
        client = aiomqtt.Client(
            cfg.host,
            cfg.port,
            username=cfg.access_token,
            identifier=cfg.client_id,
            keepalive=cfg.keepalive,
            tls_params=tls if cfg.tls else None,
            max_inflight_messages=max(20, 2 * self._window),
            timeout=CONNECT_TIMEOUT_S,
        )
        client.pending_calls_threshold = 1 << 30  # our window bounds them; no warnings
        return client

    async def _attempt(self) -> BaseException:
        """One connection and its session; returns the error that ended it."""
        self._connected_at = None
        error: BaseException | None = None
        try:
            async with self._client() as client:
                await self._serve(client)
        except* (aiomqtt.MqttError, OSError) as group:
            error = _first_leaf(group)
        except* Exception as group:  # noqa: BLE001 - a bug of ours ends the session, not the daemon
            error = _first_leaf(group)
            if isinstance(error, Exception):
                self._failed("session", "the ThingsBoard session failed", error)
        if error is None:
            return ConnectionError("session ended")
        return _frames_released(error)

    async def _serve(self, client: aiomqtt.Client) -> None:
        session = _Session(client, started=self._clock.monotonic())
        await client.subscribe([(topic, 1) for topic in tbmsg.SUBSCRIPTIONS])
        await self._announce(session, self._devices())
        self._connected_at = self._clock.monotonic()
        self._session = session
        if self._down_since is not None:
            self.stats.last_outage_s = self._connected_at - self._down_since
            log.info(
                "ThingsBoard session back after %.1f s",
                self.stats.last_outage_s,
                extra=self._fields,
            )
        else:
            log.info("connected to ThingsBoard at %s:%s", self.config.host, self.config.port)
        if self._sessions:
            self.stats.reconnects += 1
        self._sessions += 1
        self._down_since = None
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._receive(session, tg), name="uplink-receive")
                await self._request_attributes(session)
                tg.create_task(self._drain(session), name="uplink-drain")
                tg.create_task(self._publish_attributes(session), name="uplink-attributes")
                if self._health_interval > 0:
                    tg.create_task(self._health(session), name="uplink-health")
        except asyncio.CancelledError:
            if not self._stopping:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(GOODBYE_S):
                        await self.say_goodbye()
            raise
        finally:
            self._session = None
            self._store.count_resent(session.inflight_rows)

    # ---------------------------------------------------------------- devices
    async def _publish(self, client: aiomqtt.Client, topic: str, payload: bytes) -> None:
        """Publish at QoS 1 (never retained) and return once the broker acknowledged it."""
        await client.publish(topic, payload, qos=1, retain=False, timeout=ACK_TIMEOUT_S)
        self.stats.published += 1

    async def _announce(self, session: _Session, devices: Iterable[str]) -> None:
        """Publish ``v1/gateway/connect`` for each device not yet announced in this session."""
        new = [d for d in dict.fromkeys(devices) if d not in session.announced]
        if not new:
            return
        payloads = [tbmsg.connect(d, self.config.device_type) for d in new]
        await asyncio.gather(*(self._publish(session.client, tbmsg.CONNECT, p) for p in payloads))
        session.announced.update(new)

    async def device_added(self, name: str) -> None:
        """Announce a new device now if connected (every session announces all anyway)."""
        session = self._session
        if session is None:
            return
        try:
            await self._announce(session, [name])
            await self._request_attributes(session, [name])
        except aiomqtt.MqttError as exc:  # the session is ending; the next one announces it
            log.debug("could not announce %s: %s", name, exc)

    async def device_removed(self, name: str) -> None:
        """Tell the server that ``name`` left (``v1/gateway/disconnect``) if connected."""
        session = self._session
        if session is None:
            return
        session.announced.discard(name)
        try:
            await self._publish(session.client, tbmsg.DISCONNECT, tbmsg.disconnect(name))
        except aiomqtt.MqttError as exc:
            log.debug("could not send disconnect for %s: %s", name, exc)

    async def say_goodbye(self) -> None:
        """Stop draining and publish ``v1/gateway/disconnect`` for every announced device.

        The daemon calls this before cancelling `run`; a cancelled `run` that
        was not told does it itself (at most `GOODBYE_S`).
        """
        self._stopping = True
        session = self._session
        if session is None:
            return
        devices = sorted(session.announced)
        session.announced.clear()
        try:
            await asyncio.gather(
                *(
                    self._publish(session.client, tbmsg.DISCONNECT, tbmsg.disconnect(d))
                    for d in devices
                )
            )
        except aiomqtt.MqttError as exc:
            log.debug("could not send every disconnect: %s", exc)

    async def _request_attributes(
        self, session: _Session, devices: Iterable[str] | None = None
    ) -> None:
        """Ask for the shared attributes the handler wants, one request per device."""
        for device in self._devices() if devices is None else devices:
            keys = list(self._handler.shared_attribute_keys(device))
            if not keys:
                continue
            rid = next(self._request_ids)
            session.requests[rid] = (device, keys)
            payload = tbmsg.attributes_request(rid, device, keys)
            await self._publish(session.client, tbmsg.ATTRIBUTES_REQUEST, payload)

    # ------------------------------------------------------------------ drain
    async def _drain(self, session: _Session) -> None:
        """Forward the outbox: pipelined messages, rows deleted on PUBACK."""
        store = self._store
        window = asyncio.Semaphore(self._window)
        after = 0  # every row up to here is published (or acknowledged)
        async with asyncio.TaskGroup() as inflight:
            while not self._stopping:
                store.committed.clear()
                rows = await store.peek(PEEK_ROWS, after, max_bytes=self._limit * PEEK_MESSAGES)
                if not rows:
                    await store.committed.wait()
                    continue
                batches = await self._pack(rows)
                if len(batches) > 1:
                    batches.pop()  # probably not full: let the next read fill it up
                await self._announce(session, {r.device for r in rows})
                for payload, ids in batches:
                    await window.acquire()
                    session.inflight_rows += len(ids)
                    inflight.create_task(
                        self._send(session, payload, ids, window), name="uplink-send"
                    )
                    after = ids[-1]
                if not batches:  # every row was discarded
                    after = rows[-1].id

    async def _pack(self, rows: list[OutboxRow]) -> list[tuple[bytes, list[int]]]:
        """Telemetry messages for ``rows``; rows that can never fit are discarded."""
        try:
            return tbmsg.build_telemetry(rows, self._limit)
        except InvalidMessage:
            # Stored under a larger max_payload_bytes than the current one.
            too_big = [
                r.id for r in rows if tbmsg.single_entry_size(r.device, r.entry) > self._limit
            ]
            await self._store.discard(too_big)
            dropped = set(too_big)
            return tbmsg.build_telemetry([r for r in rows if r.id not in dropped], self._limit)

    async def _send(
        self, session: _Session, payload: bytes, ids: list[int], window: asyncio.Semaphore
    ) -> None:
        try:
            await self._publish(session.client, tbmsg.TELEMETRY, payload)
        finally:
            window.release()
        session.inflight_rows -= len(ids)
        await self._store.ack(ids)

    # ---------------------------------------------------------------- health
    async def _health(self, session: _Session) -> None:
        while True:
            await self._publish(session.client, tbmsg.GATEWAY_TELEMETRY, self.health_payload())
            await asyncio.sleep(self._health_interval)

    def health_payload(self) -> bytes:
        """The gateway's own telemetry: buffer and uplink figures plus the daemon's extras."""
        s = self._store.stats
        values: dict[str, Any] = {
            "buffer_depth": s.depth,
            "buffer_bytes": s.bytes,
            "forwarded": s.forwarded,
            "evicted": s.evicted,
            "received": s.received,
            "duplicates_resent": s.duplicates_resent,
            "uptime_s": round(self._clock.monotonic() - self._started, 1),
            "published": self.stats.published,
            "reconnects": self.stats.reconnects,
            "malformed_in": self.stats.malformed,
        }
        if self._health_extra is not None:
            extra = dict(self._health_extra())
            try:
                return tbmsg.gateway_telemetry({**values, **extra})
            except InvalidMessage as exc:
                log.warning("health extras left out: %s", exc)
        return tbmsg.gateway_telemetry(values)

    # --------------------------------------------------------------- receive
    async def _receive(self, session: _Session, tg: asyncio.TaskGroup) -> None:
        """Hand every incoming message to its handler; nothing in one can end the session."""
        async for message in session.client.messages:
            topic = message.topic.value
            try:
                self._dispatch(session, tg, topic, message.payload)
            except MalformedRpc as exc:
                self._malformed(topic, exc)
                self._send_reply(session, tg, exc.device, exc.id, {
                    "success": False, "error": str(exc),
                })
            except MalformedMessage as exc:
                self._malformed(topic, exc)
            except Exception as exc:  # noqa: BLE001 - outside input must never end the session
                self._failed(f"receive {topic}", f"handling a message on {topic} failed", exc)

    def _malformed(self, topic: str, exc: MalformedMessage) -> None:
        self.stats.malformed += 1
        self.faults.refused(
            f"{topic}:{exc.reason}",
            f"malformed message on {topic} dropped: {clip(str(exc))}",
            extra=fields(topic=topic),
        )

    def _failed(self, kind: str, message: str, exc: Exception, device: str | None = None) -> None:
        self.stats.handler_errors += 1
        extra = fields(topic=kind) if device is None else fields(topic=kind, node=device)
        self.faults.failed(kind, message, exc, extra=extra)

    def _dispatch(self, session: _Session, tg: asyncio.TaskGroup, topic: str, payload: Any) -> None:
        if topic == tbmsg.RPC:
            request = tbmsg.parse_rpc(payload)
            if request is None:  # a reply, echoed by a plain broker
                return
            tg.create_task(self._answer(session, tg, request), name="uplink-rpc")
        elif topic == tbmsg.ATTRIBUTES:
            update = tbmsg.parse_attribute_update(payload)
            if update is None:  # our own client attributes, echoed by a plain broker
                return
            self._give_attributes(update.device, update.data)
        elif topic == tbmsg.ATTRIBUTES_RESPONSE:
            response = tbmsg.parse_attribute_response(payload)
            asked = session.requests.pop(response.id, None)
            if asked is None or asked[0] != response.device:
                raise MalformedMessage(
                    f"response to unknown attribute request {response.id}", reason="unknown_id"
                )
            values = response.resolve(asked[1])
            if values:
                self._give_attributes(response.device, values, response=True)
        else:
            raise MalformedMessage(f"message on unexpected topic {topic}", reason="topic")

    def _give_attributes(
        self, device: str, data: Mapping[str, Any], *, response: bool = False
    ) -> None:
        try:
            if response:
                self._handler.on_attributes(device, data, response=True)
            else:
                self._handler.on_attributes(device, data)
        except Exception as exc:  # noqa: BLE001 - a handler bug must not end the session
            self._failed("attributes", f"attribute handler failed for {device}", exc, device)

    async def _answer(
        self, session: _Session, tg: asyncio.TaskGroup, request: tbmsg.RpcRequest
    ) -> None:
        """Run the handler for one RPC and reply (an error reply if it raised)."""
        try:
            data = await self._handler.on_rpc(request.device, request.method, request.params)
        except Exception as exc:  # noqa: BLE001 - the caller gets the error instead of a timeout
            self._failed(
                f"rpc {quote(request.method, 40)}",
                f"RPC {quote(request.method, 40)} to {request.device} failed",
                exc,
                request.device,
            )
            data = {"success": False, "error": f"internal error: {type(exc).__name__}: {exc}"}
        self._send_reply(session, tg, request.device, request.id, data)

    def _send_reply(
        self,
        session: _Session,
        tg: asyncio.TaskGroup,
        device: str,
        request_id: int,
        data: Mapping[str, Any],
    ) -> None:
        """Publish the reply to one RPC, within max_payload_bytes; never raises."""
        try:
            payload, change = tbmsg.fit_rpc_reply(device, request_id, data, self._rpc_limit)
        except Exception as exc:  # noqa: BLE001 - an unanswerable RPC is dropped, not fatal
            self._failed("rpc reply", f"cannot reply to RPC {request_id} of {device}", exc, device)
            return
        if change == "trimmed":
            self.stats.rpc_trimmed += 1
            self.faults.refused(
                "rpc reply:trimmed",
                f"reply to RPC {request_id} of {device} trimmed to fit {self._rpc_limit} bytes",
            )
        elif change == "refused":
            self.stats.rpc_refused += 1
            self.faults.refused(
                "rpc reply:refused",
                f"reply to RPC {request_id} of {device} replaced by an error (too large or not "
                "JSON)",
            )
        tg.create_task(self._reply(session, payload), name="uplink-rpc-reply")

    async def _reply(self, session: _Session, payload: bytes) -> None:
        await self._publish(session.client, tbmsg.RPC, payload)
        self.stats.rpc += 1


def _frames_released(error: BaseException) -> BaseException:
    """``error`` without the tracebacks of it and its causes.

    Only its type and text are used once an attempt is over (a bug of ours is
    logged with its traceback before). The tracebacks would keep their frames'
    locals alive until the garbage collector finds the cycle, among them the
    socket of a failed TLS handshake, which paho leaves open: one open socket per
    attempt while the certificate is refused. Released, it closes at once.
    """
    seen: set[int] = set()
    exc: BaseException | None = error
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__
    return error


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first exception in a (possibly nested) exception group."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
