"""A flapping uplink (small version of `python -m bench.flap`): back in every window, nothing lost.

A real daemon forwards through a gate that is shut and opened again for
outages of 1-1.5 s and up-windows of 2-2.5 s. Every window must carry
telemetry (the uplink retries about once a second however long the link has
flapped); how soon after each return is measured by the bench, not asserted.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bench import flap

pytestmark = pytest.mark.slow


async def test_every_window_of_a_flapping_link_carries_telemetry() -> None:
    args = argparse.Namespace(rounds=4, outage=(1.0, 1.5), window=(2.0, 2.5), push=0.05, seed=3,
                              gateway_dir=Path(__file__).resolve().parent.parent, verbose=False)
    result = await flap.run(args)
    assert result["missed_windows"] == 0, result
    assert result["lost"] == 0 and result["readings"] > 50, result
    assert result["daemon_exit"] == 0 and result["tracebacks"] == 0, result


def test_the_tap_reads_mqtt_packets_split_anywhere() -> None:
    publish = bytes([0x32, 9, 0, 3]) + b"a/b" + bytes([0, 7]) + b"xy"
    puback = bytes([0x40, 2, 0, 7])
    stream = publish + puback
    for cut in range(len(stream) + 1):
        tap = flap.MqttTap()
        packets = tap.feed(stream[:cut]) + tap.feed(stream[cut:])
        assert packets == [(3, 2, publish[2:]), (4, 0, puback[2:])]
