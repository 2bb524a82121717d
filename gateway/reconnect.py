"""When the uplink tries again: soon for the network, patiently for a refusal.

A site's uplink (often cellular) drops and returns many times a day, and
returns for windows of a few seconds while it flaps. Each window is a chance
to forward the buffer, so the uplink must be back within about a second of
every return, however long the outage and however often it flapped. An
attempt against a broker that is not there costs one refused or unanswered
TCP connection, so trying about once a second is cheap.

Two failures are different: the broker refusing our credentials (CONNACK
"bad user name or password", "not authorised", a refused client id or
protocol) and a host name that does not resolve. Trying again does not fix
either until someone changes the token, the config or the DNS, and hammering
a server with a bad token can get the site blocked, so those back off to a
minute.
"""

from __future__ import annotations

import socket

from aiomqtt.exceptions import MqttConnectError

from drivers.backoff import Backoff

#: Retries after a failure a retry can fix start this soon and stay this close.
RETRY_INITIAL_S = 0.2
RETRY_MAX_S = 1.0
#: Retries after a failure a retry does not fix (credentials, DNS) back off to this.
PATIENT_INITIAL_S = 2.0
PATIENT_MAX_S = 60.0
#: CONNACK codes that refuse us for who we are: MQTT 3.1.1 return codes 1, 2,
#: 4, 5 and the MQTT 5 reason codes paho reports for them (0x84 unsupported
#: protocol, 0x85 client id, 0x86 bad user name or password, 0x87 not
#: authorised, 0x8C bad authentication method).
REFUSED_CONNACK = frozenset({1, 2, 4, 5, 0x84, 0x85, 0x86, 0x87, 0x8C})


def patience_reason(error: BaseException) -> str | None:
    """Why retrying soon would not help after ``error`` (None when it may).

    aiomqtt raises the connect call's OSError as a plain MqttError ``from
    None``; the original error is still its ``__context__``, which is where a
    DNS failure (``socket.gaierror``) is found.
    """
    if isinstance(error, MqttConnectError):
        code = getattr(error.rc, "value", error.rc)
        if code in REFUSED_CONNACK:
            return "the broker refused the connection"
        return None
    seen: set[int] = set()
    exc: BaseException | None = error
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, socket.gaierror):
            return "the host name does not resolve"
        exc = exc.__cause__ or exc.__context__
    return None


class RetryPolicy:
    """The delay before the next connection attempt, from what ended the last one."""

    def __init__(self, *, soon: Backoff | None = None, patient: Backoff | None = None) -> None:
        self._soon = soon or Backoff(initial=RETRY_INITIAL_S, maximum=RETRY_MAX_S)
        self._patient = patient or Backoff(initial=PATIENT_INITIAL_S, maximum=PATIENT_MAX_S)

    def delay(self, error: BaseException) -> float:
        """Seconds to wait after ``error`` ended an attempt or a session."""
        if patience_reason(error) is not None:
            self._soon.reset()
            return self._patient.next()
        self._patient.reset()
        return self._soon.next()

    def connected(self) -> None:
        """A session was established: the next loss starts from the shortest delay."""
        self._soon.reset()
        self._patient.reset()
