"""Build the ThingsBoard kit: the dashboard and two device profiles, as JSON ThingsBoard imports.

    python thingsboard/make.py          # writes the three JSON files beside this script

The JSON files are what a grower imports (docs/thingsboard.md); this script
is where they are written from, so that a key, an actuator or an alarm is
added in one table below and every widget that shows it follows. The tests
(tests/test_thingsboard_kit.py) check that the committed files are what this
script makes, that they are well formed, and that every telemetry key,
attribute and RPC method they use is one a real gateway sends or serves.

The format is ThingsBoard's own export format (3.6 and later): widgets by
``typeFullFqn``, control widgets aimed with ``targetDeviceAliasIds`` (newer
versions convert it), entity aliases, dashboard states; device profiles as
the device profile page exports them, alarm rules in ``profileData.alarms``.
Only widget types present both in ThingsBoard 3.6 and in the newest release
are used (`WIDGET_TYPES`; docs/references.md).
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from gateway.config import CONTROLLER_NAMES  # noqa: E402 - after the path is set

DASHBOARD = HERE / "hydrogate-dashboard.json"
NODE_PROFILE = HERE / "hydro-node-profile.json"
GATEWAY_PROFILE = HERE / "hydrogate-gateway-profile.json"

#: Profile names: the nodes' is what the gateway sends as `type` (thingsboard.device_type).
NODE_PROFILE_NAME = "hydro-node"
GATEWAY_PROFILE_NAME = "hydrogate-gateway"
#: The relation ThingsBoard makes from a gateway to each device it creates.
GATEWAY_RELATION = "Created"

#: Widget types used, with their data type: all present in ThingsBoard 3.6 and in 4.x.
WIDGET_TYPES = {
    "system.cards.entities_table": "latest",
    "system.cards.attributes_card": "latest",
    "system.cards.timeseries_table": "timeseries",
    "system.charts.basic_timeseries": "timeseries",
    "system.analogue_gauges.radial_gauge_canvas_gauges": "latest",
    "system.digital_gauges.gauge_justgage": "latest",
    "system.input_widgets.update_multiple_attributes": "latest",
    "system.control_widgets.rpcbutton": "rpc",
    "system.control_widgets.rpc_debug_terminal": "rpc",
    "system.alarm_widgets.alarms_table": "alarm",
}

# ------------------------------------------------------------------ what is shown
#: Readings of a tank: key, label, units, decimals, gauge range. Issue 13's EC units
#: (``ec``, mS/cm) go here too.
READINGS = (
    ("tds", "TDS", "ppm", 0, (0, 2000)),
    ("ph", "pH", "", 2, (0, 14)),
    ("water_temp", "Water temperature", "°C", 1, (0, 40)),
    ("air_temp", "Air temperature", "°C", 1, (0, 45)),
    ("water_level", "Water level", "L", 1, (0, 30)),
    ("humidity", "Humidity", "%", 0, (0, 100)),
)
#: Actuators of a tank (NodeLink names). Issue 13's nutrient_a / nutrient_b go here.
ACTUATORS = ("nutrient", "ph_up", "ph_down", "refill")
#: Manual doses offered as buttons: actuator, ms.
DOSE_BUTTONS = (("nutrient", 2000), ("ph_up", 1000), ("ph_down", 1000), ("refill", 10000))
#: Shared attributes the gateway takes as control settings: key, label, widget input.
SETTINGS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("mode", "Mode", {"dataKeyValueType": "select",
                      "selectOptions": [{"value": "auto", "label": "auto"},
                                        {"value": "manual", "label": "manual"}]}),
    ("controller", "Controller", {"dataKeyValueType": "select",
                                  "selectOptions": [{"value": c, "label": c}
                                                    for c in CONTROLLER_NAMES]}),
    ("tds_setpoint", "TDS setpoint (ppm)", {"dataKeyValueType": "double", "step": 10,
                                            "minValue": 50, "maxValue": 5000}),
    ("ph_setpoint", "pH setpoint", {"dataKeyValueType": "double", "step": 0.05,
                                    "minValue": 3, "maxValue": 9}),
    ("schedule", "Schedule (HH:MM,HH:MM)", {"dataKeyValueType": "string"}),
    ("interval", "Interval (s, 0 = schedule only)", {"dataKeyValueType": "integer", "step": 1,
                                                     "minValue": 0, "maxValue": 86400}),
)
#: The gateway's health telemetry shown on its state.
GATEWAY_HEALTH = (
    ("nodes_up", "Nodes up"), ("backlog", "Backlog (readings)"),
    ("backlog_oldest_age_s", "Oldest buffered (s)"), ("drain_per_s", "Drain rate (/s)"),
    ("backlog_growing", "Backlog growing"), ("evicted", "Evicted"),
    ("unstored", "Not stored (disk)"), ("storage", "Storage"), ("forwarded", "Forwarded"),
    ("history_readings", "Kept for export"), ("clock_synced", "Clock synchronised"),
    ("input_refused", "Input refused"), ("uptime_s", "Up (s)"),
)


def _id(*parts: str) -> str:
    """A stable UUID for a kit element (stable files, readable diffs)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "hydrogate/thingsboard/" + "/".join(parts)))


ALIASES = {
    "gateways": {"alias": "Gateways", "filter": {
        "type": "deviceType", "resolveMultiple": True, "deviceNameFilter": "",
        "deviceTypes": [GATEWAY_PROFILE_NAME]}},
    "gateway": {"alias": "Selected gateway", "filter": {
        "type": "stateEntity", "resolveMultiple": False, "stateEntityParamName": None,
        "defaultStateEntity": None}},
    "tanks": {"alias": "Tanks of the gateway", "filter": {
        "type": "relationsQuery", "resolveMultiple": True, "rootStateEntity": True,
        "stateEntityParamName": None, "defaultStateEntity": None, "rootEntity": None,
        "direction": "FROM", "maxLevel": 1, "fetchLastLevelOnly": False,
        "filters": [{"relationType": GATEWAY_RELATION, "entityTypes": ["DEVICE"]}]}},
    "tank": {"alias": "Selected tank", "filter": {
        "type": "stateEntity", "resolveMultiple": False, "stateEntityParamName": None,
        "defaultStateEntity": None}},
}
_COLORS = ("#2196f3", "#4caf50", "#f44336", "#ffc107", "#607d8b", "#9c27b0", "#ff9800",
           "#795548", "#00bcd4", "#8bc34a")


def key(name: str, kind: str, label: str, i: int = 0, *, units: str = "",
        decimals: int | None = None, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """A data key: ``kind`` is ``timeseries``, ``attribute`` or ``entityField``."""
    out: dict[str, Any] = {"name": name, "type": kind, "label": label,
                           "color": _COLORS[i % len(_COLORS)], "settings": settings or {},
                           "_hash": (i + 1) / 100}
    if units:
        out["units"] = units
    if decimals is not None:
        out["decimals"] = decimals
    return out


def source(alias: str, keys: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "entity", "name": None, "entityAliasId": _id("alias", alias),
            "filterId": None, "dataKeys": keys}


def widget(state: str, name: str, fqn: str, *, title: str, size: tuple[float, float],
           datasources: list[dict[str, Any]], settings: dict[str, Any],
           **config: Any) -> tuple[str, dict[str, Any]]:
    wid = _id("widget", state, name)
    body: dict[str, Any] = {
        "typeFullFqn": fqn, "type": WIDGET_TYPES[fqn], "sizeX": size[0], "sizeY": size[1],
        "id": wid,
        "config": {
            "datasources": datasources, "title": title, "showTitle": True,
            "backgroundColor": "#fff", "color": "rgba(0, 0, 0, 0.87)", "padding": "8px",
            "settings": settings, "dropShadow": True, "enableFullscreen": True,
            "useDashboardTimewindow": True, "showLegend": False, "actions": {},
            "titleStyle": {"fontSize": "16px", "fontWeight": 400}, "widgetStyle": {},
            **config,
        },
    }
    return wid, body


def _realtime(ms: int) -> dict[str, Any]:
    return {"realtime": {"realtimeType": 0, "timewindowMs": ms, "interval": 1000},
            "aggregation": {"type": "NONE", "limit": 50000}}


def navigate(state: str, label: str) -> dict[str, Any]:
    return {"rowClick": [{"id": _id("action", state, label), "name": label, "icon": "launch",
                          "type": "openDashboardState", "targetDashboardStateId": state,
                          "setEntityId": True, "stateEntityParamName": None}]}


def table(state: str, name: str, *, title: str, alias: str, keys: list[dict[str, Any]],
          size: tuple[float, float], entity: bool = False,
          actions: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """An entities table (one row per entity: latest values), or a time series table."""
    if entity:
        return widget(state, name, "system.cards.entities_table", title=title, size=size,
                      datasources=[source(alias, keys)],
                      settings={"entitiesTitle": title, "enableSearch": True,
                                "displayEntityName": True, "entityNameColumnTitle": "Device",
                                "displayEntityType": False, "displayPagination": True,
                                "defaultPageSize": 10, "defaultSortOrder": "entityName"},
                      actions=actions or {}, useDashboardTimewindow=False,
                      timewindow=_realtime(86_400_000))
    return widget(state, name, "system.cards.timeseries_table", title=title, size=size,
                  datasources=[source(alias, keys)],
                  settings={"showTimestamp": True, "displayPagination": True,
                            "defaultPageSize": 10, "hideEmptyLines": True, "enableSearch": True},
                  useDashboardTimewindow=False, timewindow=_realtime(7 * 86_400_000))


def card(state: str, name: str, *, title: str, alias: str, keys: list[dict[str, Any]],
         size: tuple[float, float]) -> tuple[str, dict[str, Any]]:
    """The latest value of each key, with its label."""
    return widget(state, name, "system.cards.attributes_card", title=title, size=size,
                  datasources=[source(alias, keys)], settings={})


def chart(state: str, name: str, *, title: str, alias: str, keys: list[dict[str, Any]],
          size: tuple[float, float]) -> tuple[str, dict[str, Any]]:
    """A line chart of the keys over the dashboard's time window."""
    return widget(state, name, "system.charts.basic_timeseries", title=title, size=size,
                  datasources=[source(alias, keys)],
                  settings={"shadowSize": 4, "smoothLines": False},
                  showLegend=True, legendConfig={"direction": "column", "position": "bottom",
                                                 "showMin": True, "showMax": True,
                                                 "showAvg": True, "showTotal": False})


def alarms(state: str, title: str, alias: str,
           size: tuple[float, float]) -> tuple[str, dict[str, Any]]:
    """The active alarms of the entities of ``alias`` (and those propagated to them)."""
    columns = [{"name": n, "type": "alarm", "label": label, "color": _COLORS[i],
                "settings": {}, "_hash": (i + 1) / 100}
               for i, (n, label) in enumerate((("createdTime", "Created"),
                                               ("originator", "Device"), ("type", "Alarm"),
                                               ("severity", "Severity"), ("status", "Status")))]
    return widget(state, f"alarms-{alias}", "system.alarm_widgets.alarms_table", title=title,
                  size=size, datasources=[],
                  settings={"enableSearch": True, "displayPagination": True,
                            "defaultPageSize": 10, "alarmsTitle": title, "displayDetails": True,
                            "allowAcknowledgment": True, "allowClear": True},
                  alarmSource={"type": "entity", "name": "alarms",
                               "entityAliasId": _id("alias", alias), "filterId": None,
                               "dataKeys": columns},
                  alarmFilterConfig={"statusList": ["ACTIVE"], "severityList": [],
                                     "typeList": [], "searchPropagatedAlarms": True},
                  alarmsPollingInterval=5, alarmsMaxCountLoad=0, alarmsFetchSize=100,
                  useDashboardTimewindow=False, timewindow=_realtime(30 * 86_400_000))


def rpc_button(state: str, label: str, method: str,
               params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A button that sends the two-way RPC ``method`` with ``params`` to the selected tank."""
    return widget(state, f"rpc-{label}", "system.control_widgets.rpcbutton", title=label,
                  size=(4, 2), datasources=[],
                  settings={"buttonText": label, "oneWayElseTwoWay": False, "showError": True,
                            "methodName": method, "methodParams": json.dumps(params),
                            "requestTimeout": 10000, "requestPersistent": False,
                            "styleButton": {"isRaised": True, "isPrimary": method != "stop"}},
                  targetDeviceAliasIds=[_id("alias", "tank")], showTitle=False)


Placed = tuple[tuple[str, dict[str, Any]], int, int]


# ------------------------------------------------------------------- the dashboard
def dashboard() -> dict[str, Any]:
    """The dashboard: gateways -> one gateway and its tanks -> one tank."""
    widgets: dict[str, dict[str, Any]] = {}
    states: dict[str, dict[str, Any]] = {}

    def state(name: str, title: str, root: bool, placed: list[Placed]) -> None:
        layout: dict[str, Any] = {}
        for (wid, body), row, col in placed:
            widgets[wid] = body
            layout[wid] = {"sizeX": body["sizeX"], "sizeY": body["sizeY"], "row": row,
                           "col": col}
        states[name] = {"name": title, "root": root, "layouts": {"main": {
            "widgets": layout,
            "gridSettings": {"backgroundColor": "#eeeeee", "columns": 24, "margin": 10,
                             "outerMargin": True, "backgroundSizeMode": "100%",
                             "autoFillHeight": False, "mobileAutoFillHeight": False,
                             "mobileRowHeight": 70, "layoutType": "default"}}}}

    health = [key(k, "timeseries", label, i) for i, (k, label) in enumerate(GATEWAY_HEALTH)]
    state("default", "Gateways", True, [
        (table("default", "gateways", title="Gateways", alias="gateways",
               keys=[key("active", "attribute", "Online"), *health[:6]], size=(24, 8),
               entity=True, actions=navigate("gateway", "Open gateway")), 0, 0),
        (alarms("default", "Alarms of the gateways", "gateways", (24, 6)), 8, 0),
    ])
    state("gateway", "${entityName}", False, _gateway_state(health))
    state("tank", "${entityName}", False, _tank_state())
    return {
        "title": "Hydroponics (hydrogate)",
        "image": None,
        "mobileHide": False,
        "mobileOrder": None,
        "configuration": {
            "description": "hydrogate's tanks: open a gateway, then a tank. Made by "
                           "thingsboard/make.py; docs/thingsboard.md says how to import it.",
            "widgets": widgets,
            "states": states,
            "entityAliases": {_id("alias", a): {"id": _id("alias", a), **body}
                              for a, body in ALIASES.items()},
            "filters": {},
            "timewindow": {"hideInterval": False, "hideAggregation": False,
                           "selectedTab": 0, **_realtime(6 * 3_600_000)},
            "settings": {"stateControllerId": "entity", "showTitle": True,
                         "showDashboardsSelect": True, "showEntitiesSelect": True,
                         "showDashboardTimewindow": True, "showDashboardExport": True,
                         "toolbarAlwaysOpen": True},
        },
        "name": "Hydroponics (hydrogate)",
    }


def _gateway_state(health: list[dict[str, Any]]) -> list[Placed]:
    """One gateway: its tanks (click one), its health, its backlog over time, alarms."""
    tank_columns = [
        key("active", "attribute", "Online", 0),
        key("link", "timeseries", "Link", 1), key("link_reason", "timeseries", "Why", 2),
        key("severity", "timeseries", "Severity", 3),
        key("severity_reason", "timeseries", "Reason", 4),
        *(key(k, "timeseries", label, 5 + i, units=u, decimals=d)
          for i, (k, label, u, d, _) in enumerate(READINGS[:2])),
    ]
    return [
        (table("gateway", "tanks", title="Tanks", alias="tanks", keys=tank_columns,
               size=(16, 7), entity=True, actions=navigate("tank", "Open tank")), 0, 0),
        (card("gateway", "health", title="Gateway", alias="gateway", keys=health,
              size=(8, 7)), 0, 16),
        (chart("gateway", "backlog", title="Backlog and the age of its oldest reading",
               alias="gateway", keys=[key("backlog", "timeseries", "Backlog (readings)", 0),
                                      key("backlog_oldest_age_s", "timeseries", "Oldest (s)",
                                          1)], size=(12, 6)), 7, 0),
        (chart("gateway", "evictions", title="Evicted, not stored, drain rate", alias="gateway",
               keys=[key("evicted", "timeseries", "Evicted", 2),
                     key("unstored", "timeseries", "Not stored", 3),
                     key("drain_per_s", "timeseries", "Drain rate (/s)", 4)],
               size=(12, 6)), 7, 12),
        (alarms("gateway", "Alarms of the tanks", "tanks", (24, 6)), 13, 0),
    ]


def _tank_state() -> list[Placed]:
    """One tank: gauges, charts, severity, doses, refusals, settings, buttons, alarms."""
    placed: list[Placed] = []
    for i, (k, label, units, decimals, (lo, hi)) in enumerate(READINGS):
        fqn = ("system.analogue_gauges.radial_gauge_canvas_gauges" if i < 2
               else "system.digital_gauges.gauge_justgage")
        placed.append((widget("tank", f"gauge-{k}", fqn, title=label, size=(4, 4),
                              datasources=[source("tank", [key(k, "timeseries", label, i,
                                                               units=units,
                                                               decimals=decimals)])],
                              settings={"minValue": lo, "maxValue": hi, "units": units,
                                        "valueDec": decimals}), 0, 4 * i))
    doses = [key("controller", "timeseries", "Decided by", 0)]
    for i, a in enumerate(ACTUATORS):
        doses += [key(f"{a}_ms", "timeseries", f"{a} ms", 2 * i + 1),
                  key(f"{a}_duty", "timeseries", f"{a} duty", 2 * i + 2)]
    settings_keys = [
        key(k, "attribute", label, i, settings={
            "dataKeyType": "shared", "required": False, "isEditable": "editable",
            "dataKeyHidden": False, "appearance": "outline", "subscriptSizing": "fixed",
            **spec})
        for i, (k, label, spec) in enumerate(SETTINGS)
    ]
    in_force = [key(f"effective_{k}", "attribute", label, i)
                for i, (k, label, _) in enumerate(SETTINGS)]
    in_force += [key("settings_source", "attribute", "From", 7),
                 key("settings_refused", "attribute", "Last update refused", 8)]
    buttons = [rpc_button("tank", "Start a cycle", "force_on", {}),
               rpc_button("tank", "Abort the cycle", "force_stop", {}),
               rpc_button("tank", "Stop every pump", "stop", {}),
               rpc_button("tank", "Acknowledge (pH lock)", "acknowledge", {})]
    buttons += [rpc_button("tank", f"Dose {a} {ms / 1000:g} s", "actuate",
                           {"actuator": a, "ms": ms}) for a, ms in DOSE_BUTTONS]

    def ts(name: str, label: str, i: int, units: str = "") -> dict[str, Any]:
        return key(name, "timeseries", label, i, units=units)

    placed += [
        (chart("tank", "tds", title="TDS", alias="tank", keys=[ts("tds", "TDS", 0, "ppm")],
               size=(12, 6)), 4, 0),
        (chart("tank", "ph", title="pH", alias="tank", keys=[ts("ph", "pH", 1)],
               size=(12, 6)), 4, 12),
        (chart("tank", "temperatures", title="Temperatures", alias="tank",
               keys=[ts("water_temp", "Water", 2, "°C"), ts("air_temp", "Air", 3, "°C")],
               size=(12, 6)), 10, 0),
        (chart("tank", "level", title="Water level and humidity", alias="tank",
               keys=[ts("water_level", "Level (L)", 4), ts("humidity", "Humidity (%)", 5)],
               size=(12, 6)), 10, 12),
        (table("tank", "severity", title="Severity and link", alias="tank",
               keys=[ts("severity", "Severity", 0), ts("severity_reason", "Reason", 1),
                     ts("link", "Link", 2), ts("link_reason", "Why", 3)],
               size=(12, 6)), 16, 0),
        (card("tank", "actuators", title="Actuators (1 = running)", alias="tank",
              keys=[ts(f"{a}_on", a, i) for i, a in enumerate(ACTUATORS)], size=(6, 6)),
         16, 12),
        (card("tank", "in-force", title="In force (what the gateway applies)", alias="tank",
              keys=in_force, size=(6, 6)), 16, 18),
        (table("tank", "doses", title="Doses, and the controller that decided", alias="tank",
               keys=doses, size=(12, 6)), 22, 0),
        (table("tank", "refused", title="Refused and shortened doses, pH lock", alias="tank",
               keys=[ts("safety_refused", "Refused", 0), ts("safety_clamped", "Shortened", 1),
                     ts("ph_lock", "pH lock", 2)], size=(12, 6)), 22, 12),
        (widget("tank", "settings", "system.input_widgets.update_multiple_attributes",
                title="Settings (shared attributes)", size=(12, 7),
                datasources=[source("tank", settings_keys)],
                settings={"showActionButtons": True, "updateAllValues": False,
                          "saveButtonLabel": "Save", "resetButtonLabel": "Undo",
                          "showResultMessage": True, "showGroupTitle": False,
                          "fieldsAlignment": "row", "fieldsInRow": 2, "columnGap": 10,
                          "rowGap": 5, "widgetTitle": "Settings"}), 28, 0),
        *((b, 28 + 2 * (i // 3), 12 + 4 * (i % 3)) for i, b in enumerate(buttons)),
        (widget("tank", "terminal", "system.control_widgets.rpc_debug_terminal",
                title='RPC terminal (e.g. actuate {"actuator":"nutrient","ms":1500})',
                size=(12, 6), datasources=[], settings={"requestTimeout": 10000},
                targetDeviceAliasIds=[_id("alias", "tank")]), 35, 0),
        (alarms("tank", "Alarms", "tank", (12, 6)), 35, 12),
    ]
    return placed


# ------------------------------------------------------------------ device profiles
def _pred(kind: str, operation: str, value: Any) -> dict[str, Any]:
    return {"type": kind, "operation": operation,
            "value": {"defaultValue": value, "userValue": None, "dynamicValue": None},
            **({"ignoreCase": False} if kind == "STRING" else {})}


def cond(key_type: str, name: str, kind: str, operation: str, value: Any) -> dict[str, Any]:
    """One condition: ``key_type`` TIME_SERIES or ATTRIBUTE; ``kind`` STRING/BOOLEAN/NUMERIC."""
    return {"key": {"type": key_type, "key": name}, "valueType": kind, "value": None,
            "predicate": _pred(kind, operation, value)}


def rule(conditions: list[dict[str, Any]], details: str | None = None) -> dict[str, Any]:
    return {"condition": {"condition": conditions, "spec": {"type": "SIMPLE"}},
            "schedule": None, "alarmDetails": details, "dashboardId": None}


def alarm(name: str, create: dict[str, dict[str, Any]], clear: dict[str, Any]) -> dict[str, Any]:
    return {"id": _id("alarm", name), "alarmType": name, "createRules": create,
            "clearRule": clear, "propagate": False, "propagateToOwner": False,
            "propagateToTenant": False, "propagateRelationTypes": None}


def stale(what: str) -> dict[str, Any]:
    """No data for the device's inactivity timeout (ThingsBoard's own ``active`` attribute)."""
    return alarm(
        f"No data from the {what}",
        {"MAJOR": rule([cond("ATTRIBUTE", "active", "BOOLEAN", "EQUAL", False)],
                       f"ThingsBoard received nothing from this {what} for its inactivity"
                       " timeout (10 minutes unless the server attribute inactivityTimeout"
                       " says otherwise)")},
        rule([cond("ATTRIBUTE", "active", "BOOLEAN", "EQUAL", True)]),
    )


def profile(name: str, description: str, alarms: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": name, "description": description, "image": None, "type": "DEFAULT",
        "transportType": "DEFAULT", "provisionType": "DISABLED", "defaultRuleChainId": None,
        "defaultDashboardId": None, "defaultQueueName": None,
        "profileData": {
            "configuration": {"type": "DEFAULT"},
            "transportConfiguration": {"type": "DEFAULT"},
            "provisionConfiguration": {"type": "DISABLED", "provisionDeviceSecret": None},
            "alarms": alarms,
        },
        "provisionDeviceKey": None, "firmwareId": None, "softwareId": None,
        "externalId": None, "default": False,
    }


def node_profile() -> dict[str, Any]:
    reason = cond("TIME_SERIES", "severity_reason", "STRING", "NOT_EQUAL", "")
    return profile(NODE_PROFILE_NAME, "A tank behind hydrogate (made by thingsboard/make.py)", [
        alarm("Tank severity", {
            "CRITICAL": rule([cond("TIME_SERIES", "severity", "STRING", "EQUAL", "urgent"),
                              reason], "${severity_reason}"),
            "WARNING": rule([cond("TIME_SERIES", "severity", "STRING", "EQUAL", "warning"),
                             reason], "${severity_reason}"),
        }, rule([cond("TIME_SERIES", "severity", "STRING", "NOT_EQUAL", "warning"),
                 cond("TIME_SERIES", "severity", "STRING", "NOT_EQUAL", "urgent")])),
        alarm("Node link down", {
            "MAJOR": rule([cond("TIME_SERIES", "link", "STRING", "EQUAL", "down"),
                           cond("TIME_SERIES", "link_reason", "STRING", "NOT_EQUAL", "")],
                          "${link_reason}"),
        }, rule([cond("TIME_SERIES", "link", "STRING", "EQUAL", "up")])),
        stale("tank's node (or its gateway)"),
    ])


def gateway_profile() -> dict[str, Any]:
    return profile(GATEWAY_PROFILE_NAME,
                   "A hydrogate gateway: check 'Is gateway' on the device (thingsboard/make.py)", [
        alarm("Backlog growing while connected", {
            "WARNING": rule([cond("TIME_SERIES", "backlog_growing", "BOOLEAN", "EQUAL", True),
                             cond("TIME_SERIES", "backlog", "NUMERIC", "GREATER", 0)],
                            "${backlog} readings wait and the backlog keeps growing although"
                            " the gateway is connected: ThingsBoard takes them slower than"
                            " they come"),
        }, rule([cond("TIME_SERIES", "backlog_growing", "BOOLEAN", "EQUAL", False)])),
        stale("gateway"),
    ])


def write() -> None:
    """Write the three files (sorted keys, two-space indent: stable diffs)."""
    for path, body in ((DASHBOARD, dashboard()), (NODE_PROFILE, node_profile()),
                       (GATEWAY_PROFILE, gateway_profile())):
        path.write_text(json.dumps(body, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {path.relative_to(HERE.parent)}")


if __name__ == "__main__":
    write()
