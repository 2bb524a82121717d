"""Every RPC method in one table: name, level, params, checks and handler.

Two ways in, one table: ThingsBoard's server-side RPC (gateway/uplink.py ->
``Gateway.on_rpc``) and the local socket (gateway/localrpc.py -> ``Gateway.on_rpc``
with a ``device``, ``Gateway.on_gateway_rpc`` without). Both end in
:func:`answer_node` or :func:`answer_gateway`, which look the method up in
:data:`METHODS` and apply its checks in one order:

1. an unknown method is refused with the known ones named;
2. ``waits_for_procedure``: refused while a titration or calibration runs;
3. ``needs_control``: refused on a node without a ``control:`` section;
4. ``parse`` turns ``params`` into the handler's argument, or refuses them
   with the field's name (the guided procedures take several forms of
   params, told apart by their own state: their modules check them);
5. the handler runs; a `CommandError` it raises is the reply's ``error``.

The reply's data is ``{"success": true, ...}`` or ``{"success": false,
"error": "..."}``, never silence. docs/thingsboard.md (node methods) and
docs/architecture.md (gateway methods) list the same names
(tests/test_rpc_table.py checks it).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from gateway.control import NodeControl, parse_dose
from gateway.errors import CommandError

Level = Literal["node", "gateway"]


class NodeTarget(Protocol):
    """What a node-level RPC acts on (`gateway.node.NodeRunner`)."""

    @property
    def name(self) -> str:
        """The node's name."""

    @property
    def control(self) -> NodeControl:
        """The node's control: every handler but ``get_state`` is one of its methods."""

    def state(self) -> dict[str, Any]:
        """The node's state as ``get_state`` reports it."""


class GatewayTarget(Protocol):
    """What a gateway-level request acts on (`gateway.daemon.Gateway`)."""

    async def rpc_ping(self) -> dict[str, Any]:
        """Name, version, uptime and nodes."""

    async def rpc_status(self) -> dict[str, Any]:
        """The gateway's state (gateway/status.py)."""

    async def rpc_flush(self) -> dict[str, Any]:
        """Commit what waits in memory, for the history."""


def _nothing(params: Any) -> None:
    """Methods without params ignore whatever was sent (as they always have)."""
    return


def _as_sent(params: Any) -> Any:
    """Params checked by the handler's own module."""
    return params


def _mode(params: Any) -> Any:
    """``set_mode``'s mode, from ``{"mode": ...}`` or given bare; validated as a setting."""
    return params.get("mode") if isinstance(params, Mapping) else params


@dataclass(frozen=True)
class NodeMethod:
    """An RPC to one node's device."""

    name: str
    params: str
    handler: Callable[[NodeTarget, Any], Awaitable[dict[str, Any]]]
    parse: Callable[[Any], Any] = _nothing
    #: Refused on a node without a ``control:`` section.
    needs_control: bool = False
    #: Refused while a guided procedure (titration, pump or probe calibration) runs.
    waits_for_procedure: bool = False
    level: Level = "node"


@dataclass(frozen=True)
class GatewayMethod:
    """A request to the gateway itself (local socket, no ``device``)."""

    name: str
    handler: Callable[[GatewayTarget], Awaitable[dict[str, Any]]]
    level: Level = "gateway"


async def _get_state(node: NodeTarget, _: None) -> dict[str, Any]:
    return node.state()


def _control(
    method: Callable[[NodeControl], Awaitable[dict[str, Any]]],
) -> Callable[[NodeTarget, Any], Awaitable[dict[str, Any]]]:
    """A handler that is a method of the node's control without argument."""
    async def handler(node: NodeTarget, _: None) -> dict[str, Any]:
        return await method(node.control)
    return handler


def _control_with(
    method: Callable[[NodeControl, Any], Awaitable[dict[str, Any]]],
) -> Callable[[NodeTarget, Any], Awaitable[dict[str, Any]]]:
    """A handler that is a method of the node's control taking the parsed params."""
    async def handler(node: NodeTarget, arg: Any) -> dict[str, Any]:
        return await method(node.control, arg)
    return handler


#: Every RPC method: the interface contract's (docs/references.md, [Interface]), the guided
#: procedures', and the gateway's own.
METHODS: tuple[NodeMethod | GatewayMethod, ...] = (
    NodeMethod("get_state", "—", _get_state),
    NodeMethod("stop", "—", _control(NodeControl.rpc_stop)),
    NodeMethod("actuate", "actuator, ms, duty (optional, 255)",
               _control_with(NodeControl.rpc_actuate), parse=parse_dose),
    NodeMethod("force_on", "—", _control(NodeControl.rpc_force_on),
               needs_control=True, waits_for_procedure=True),
    NodeMethod("force_stop", "—", _control(NodeControl.rpc_force_stop), needs_control=True),
    NodeMethod("set_mode", "mode (auto or manual)", _control_with(NodeControl.rpc_set_mode),
               parse=_mode, needs_control=True),
    NodeMethod("acknowledge", "—", _control(NodeControl.rpc_acknowledge)),
    NodeMethod("titrate", "actuator, move (optional), force (optional)",
               _control_with(NodeControl.rpc_titrate), parse=_as_sent),
    NodeMethod("pump_calibrate",
               "actuator and ms, or actuator and ml, or cancel; force (optional; needed in "
               "auto mode)",
               _control_with(NodeControl.rpc_pump_calibrate), parse=_as_sent),
    NodeMethod("probe_calibrate", "probe, step (start, read, cancel) and its options",
               _control_with(NodeControl.rpc_probe_calibrate), parse=_as_sent),
    GatewayMethod("ping", lambda gateway: gateway.rpc_ping()),
    GatewayMethod("status", lambda gateway: gateway.rpc_status()),
    GatewayMethod("flush", lambda gateway: gateway.rpc_flush()),
)

NODE_METHODS: Mapping[str, NodeMethod] = {
    m.name: m for m in METHODS if isinstance(m, NodeMethod)
}
GATEWAY_METHODS: Mapping[str, GatewayMethod] = {
    m.name: m for m in METHODS if isinstance(m, GatewayMethod)
}


async def call_node(node: NodeTarget, method: str, params: Any) -> dict[str, Any]:
    """Carry out a node-level RPC; raises CommandError with the reason to report."""
    entry = NODE_METHODS.get(method)
    if entry is None:
        raise CommandError(f"unknown method {method!r}")
    control = node.control
    if entry.waits_for_procedure:
        busy = control.procedure()
        if busy is not None:
            raise CommandError(busy)
    if entry.needs_control and not control.automatic:
        raise CommandError(f"node {node.name} has no control section")
    return await entry.handler(node, entry.parse(params))


async def answer_node(node: NodeTarget, method: str, params: Any) -> dict[str, Any]:
    """The reply's data for a node-level RPC: ``success`` and the result or the error."""
    try:
        result = await call_node(node, method, params)
    except CommandError as exc:
        return {"success": False, "error": str(exc)}
    return {"success": True, **result}


async def answer_gateway(gateway: GatewayTarget, method: str) -> dict[str, Any]:
    """The reply's data for a request to the gateway itself."""
    entry = GATEWAY_METHODS.get(method)
    if entry is None:
        return {"success": False, "error": f"unknown gateway method {method!r} "
                f"(known: {', '.join(GATEWAY_METHODS)})"}
    try:
        result = await entry.handler(gateway)
    except CommandError as exc:
        return {"success": False, "error": str(exc)}
    return {"success": True, **result}
