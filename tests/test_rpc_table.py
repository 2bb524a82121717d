"""The one table of RPC methods (gateway/rpc.py) and the docs list the same methods."""

from __future__ import annotations

import re
from pathlib import Path

from gateway.rpc import GATEWAY_METHODS, METHODS, NODE_METHODS

DOCS = Path(__file__).resolve().parent.parent / "docs"
#: What the interface contract fixes (docs/references.md, [Interface]): the server-side RPCs
#: to a node's device.
CONTRACT_METHODS = {"actuate", "stop", "force_on", "force_stop", "set_mode", "get_state"}


def documented(page: str, heading: str) -> set[str]:
    """The methods in the first column of the tables after ``heading`` on ``page``."""
    text = (DOCS / page).read_text(encoding="utf-8")
    start = text.index(heading)
    end = text.find("\n#", start + len(heading))
    section = text[start: end if end != -1 else len(text)]
    return set(re.findall(r"^\s*\| `([a-z_]+)` \|", section, flags=re.MULTILINE))


def test_every_name_is_in_the_table_once() -> None:
    names = [m.name for m in METHODS]
    assert len(names) == len(set(names))
    assert set(names) == set(NODE_METHODS) | set(GATEWAY_METHODS)
    assert set(NODE_METHODS) >= CONTRACT_METHODS


def test_node_methods_are_the_ones_docs_thingsboard_lists() -> None:
    assert documented("thingsboard.md", "## RPC") == set(NODE_METHODS)


def test_gateway_methods_are_the_ones_docs_architecture_lists() -> None:
    assert documented("architecture.md", "The gateway-level methods") == set(GATEWAY_METHODS)


def test_the_cycle_methods_need_a_control_section() -> None:
    needs = {m.name for m in NODE_METHODS.values() if m.needs_control}
    assert needs == {"force_on", "force_stop", "set_mode"}
    assert {m.name for m in NODE_METHODS.values() if m.waits_for_procedure} == {"force_on"}
