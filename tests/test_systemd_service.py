"""The installed service under a real systemd: install, sandbox, watchdog, reload, restart, upgrade.

One systemd namespace (tests/systemd_harness.py) for the module, in which
``scripts/install.sh`` installs hydrogate exactly as on a Pi (Debian's python3
and packages, a release venv, the unit file, the hydrogate user), offline from
the wheels ``scripts/setup.sh --test`` downloaded. The tests then drive the
real unit with ``systemctl`` and read the real journal. They run in file order:
the last ones upgrade and uninstall.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from gateway.storefile import SCHEMA_VERSION
from tests.conftest import MOSQUITTO, free_port, wait_port
from tests.systemd_harness import SystemdNamespace, available
from tests.test_tls import make_ca_and_server

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
WHEELS = REPO / ".cache" / "install" / "wheels"
UNIT = "hydrogate.service"
DROPIN = "/etc/systemd/system/hydrogate.service.d"


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SystemdNamespace]:
    """A systemd namespace with hydrogate installed by scripts/install.sh."""
    why = available()
    if why is not None:
        pytest.fail(f"cannot start systemd in a namespace here: {why}")
    for folder in ("amd64", "build"):
        if not any((WHEELS / folder).glob("*.whl")):
            pytest.fail(f"no wheels in {WHEELS / folder}: run scripts/setup.sh --test")
    space = SystemdNamespace(tmp_path_factory.mktemp("systemd"))
    space.start()
    try:
        done = install(space)
        assert done.returncode == 0, done.stdout + done.stderr
        yield space
    finally:
        space.stop()


def install(space: SystemdNamespace, *args: str, src: Path = REPO) -> subprocess.CompletedProcess[str]:
    """scripts/install.sh inside the namespace, pip offline from the downloaded wheels."""
    return space.run(
        [str(src / "scripts" / "install.sh"), *args],
        env={"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": f"{WHEELS / 'amd64'} {WHEELS / 'build'}"},
        check=False, timeout=600,
    )


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """Mosquitto with TLS on 127.0.0.1 (a test CA): the port and the CA file."""
    d = tmp_path_factory.mktemp("tls")
    ca, cert, key = make_ca_and_server(d, "good")
    port = free_port()
    conf = d / "mosquitto.conf"
    conf.write_text(
        f"user root\nlistener {port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\n"
        "allow_anonymous true\nlog_type error\n"
    )
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield port, ca
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def pty_node() -> Iterator[str]:
    """A simulated node on a pty, owned root:dialout 0660 like a real /dev/ttyUSB0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sim", "--pty", "--name", "tank-a", "--speed", "1"],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line[:2] == ["tank-a", "pty"], line
        path = line[2]
        shutil.chown(path, group="dialout")
        os.chmod(path, 0o660)
        yield path
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def config(pty: str, tls_port: int, **control: Any) -> dict[str, Any]:
    """A config with the pty node (ml control) and the TLS broker as ThingsBoard."""
    return {
        "gateway": {"name": "gw-systemd", "health_interval": 1},
        "storage": {"path": "/var/lib/hydrogate/hydrogate.sqlite"},
        "thingsboard": {"host": "127.0.0.1", "port": tls_port, "tls": True,
                        "ca_file": "/etc/hydrogate/ca.pem", "access_token": "sd-token"},
        "nodes": [{
            "name": "tank-a", "url": f"serial://{pty}?baud=115200", "poll_interval": 0.5,
            "plant": {"tank_volume_l": 10, "stock_ppm": 10000,
                      "flow_ml_s": {"nutrient": 1.58, "ph_up": 1.58, "ph_down": 1.58,
                                    "refill": 1.58}},
            "control": {"controller": "ml", "tds_setpoint": 700, "ph_setpoint": 6.0,
                        **control},
        }],
    }


def write_config(space: SystemdNamespace, data: dict[str, Any] | str) -> None:
    text = data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False)
    target = space.path("/etc/hydrogate/config.yaml")
    target.write_text(text)
    shutil.chown(target, "root", "root")  # group hydrogate by name: ns has the user
    space.run(["chgrp", "hydrogate", "/etc/hydrogate/config.yaml"])
    target.chmod(0o640)


def dropin(space: SystemdNamespace, text: str) -> None:
    """The tests' own drop-in for the unit (replaces the previous one), then daemon-reload."""
    space.run(["mkdir", "-p", DROPIN])
    space.path(f"{DROPIN}/test.conf").write_text("[Service]\n" + text)
    space.systemctl("daemon-reload")


def entries(space: SystemdNamespace, *match: str) -> list[dict[str, Any]]:
    return space.journal("-u", UNIT, *match)


def messages(space: SystemdNamespace, *match: str) -> list[str]:
    return [str(e.get("MESSAGE", "")) for e in entries(space, *match)]


def cursor(space: SystemdNamespace) -> str:
    """The journal's current end: journal(--after-cursor=...) shows only what follows."""
    got = space.journal("-n", "1")
    return str(got[-1]["__CURSOR"]) if got else ""


def since(space: SystemdNamespace, mark: str, *match: str) -> list[dict[str, Any]]:
    extra = [f"--after-cursor={mark}"] if mark else []
    return space.journal("-u", UNIT, *extra, *match)


# ------------------------------------------------------------------- tests
def test_the_unit_passes_verify_and_rates_at_most_2(ns: SystemdNamespace) -> None:
    # verify against the machine's own units (systemd in the namespace knows only stubs).
    done = ns.run(["systemd-analyze", "verify", f"/etc/systemd/system/{UNIT}"], check=False,
                  env={"SYSTEMD_UNIT_PATH": f"/etc/systemd/system:{ns.host_units}"})
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    done = ns.run(["systemd-analyze", "security", "--offline=true", "--no-pager",
                   f"/etc/systemd/system/{UNIT}"], check=False)
    level = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert level is not None, done.stdout + done.stderr
    assert float(level.group(1)) <= 2.0, done.stdout


def test_the_install_uses_debian_packages_and_a_small_release(ns: SystemdNamespace) -> None:
    venv = "/opt/hydrogate/venv"
    probe = ns.run([f"{venv}/bin/python", "-c", (
        "import numpy, yaml, serial_asyncio, systemd, tqdm, aiomqtt, orjson, rules.mlruntime as r;"
        "print(numpy.__file__, yaml.__file__, serial_asyncio.__file__, systemd.__file__,"
        " tqdm.__file__);"
        "print(r.interpreter_backend()[0])")])
    debian, backend = probe.stdout.splitlines()
    assert all(p.startswith("/usr/lib/python3/dist-packages/") for p in debian.split()), debian
    assert backend == "tflite_runtime.interpreter"
    size = int(ns.run(["du", "-sm", f"{venv}/"]).stdout.split()[0])
    assert size < 40, f"the release venv takes {size} MiB"
    assert not ns.path(f"{venv}/bin/pip").exists()  # Debian's pip installs into it
    assert ns.run(["readlink", "/usr/local/bin/hydrogate"]).stdout.strip() == \
        f"{venv}/bin/hydrogate"


def test_serial_and_tls_work_inside_the_sandbox(
    ns: SystemdNamespace, tls: tuple[int, Path], pty_node: str
) -> None:
    port, ca = tls
    shutil.copy(ca, ns.path("/etc/hydrogate/ca.pem"))
    write_config(ns, config(pty_node, port))
    seen: list[Any] = []
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="sd-test")
    sub.tls_set(ca_certs=str(ca))
    sub.on_message = lambda c, u, m: seen.append(json.loads(m.payload))
    sub.connect("127.0.0.1", port)
    sub.subscribe("v1/gateway/telemetry", qos=1)
    sub.loop_start()
    try:
        dropin(ns, "RestartSec=1\n")
        mark = cursor(ns)
        ns.systemctl("start", UNIT)
        # The node on a serial port (root:dialout 0660, like /dev/ttyUSB0): readings flow.
        ns.wait_for("link up", lambda: [
            e for e in since(ns, mark, "NODE=tank-a") if "link up" in str(e.get("MESSAGE"))
        ])
        # ... and reach "ThingsBoard" over TLS, checked against the CA in /etc/hydrogate.
        ns.wait_for("telemetry over TLS", lambda: any("tank-a" in p for p in seen), timeout=30)
    finally:
        sub.loop_stop()
        sub.disconnect()
    text = "\n".join(str(e.get("MESSAGE")) for e in since(ns, mark))
    assert "ml cannot run" not in text and "Error in cpuinfo" not in text, text


_PROBE = """
import errno, mmap, os
def try_open(path):
    try:
        os.close(os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK))
    except OSError as exc:
        return errno.errorcode[exc.errno]
    return "opened"
print("console", try_open("/dev/hg-console"))
print("ttyS", try_open("/dev/hg-ttyS"))
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    print("wx allowed")
except OSError as exc:
    print("wx", errno.errorcode[exc.errno])
from rules.mlruntime import Model, interpreter_backend
m = Model.load()
print("model", interpreter_backend()[0], m.predict({f: sum(m.spec.ranges[f]) / 2
                                                   for f in m.spec.features}))
"""


def in_the_units_sandbox(ns: SystemdNamespace, code: str) -> list[str]:
    """Run Python ``code`` as a oneshot copy of the installed unit: same user, same sandbox."""
    unit = ns.path(f"/etc/systemd/system/{UNIT}").read_text()
    unit = re.sub(r"^(Type|ExecStart|ExecReload|WatchdogSec|NotifyAccess|Restart\w*)=.*\n", "",
                  unit, flags=re.M)
    ns.path("/run/hydrogate-probe.py").write_text(code)
    unit = unit.replace("[Service]\n", "[Service]\nType=oneshot\nExecStart=/opt/hydrogate/venv/"
                        "bin/python /run/hydrogate-probe.py\n")
    ns.path("/etc/systemd/system/hydrogate-probe.service").write_text(unit)
    ns.systemctl("daemon-reload")
    mark = cursor(ns)
    ns.systemctl("start", "hydrogate-probe.service")
    extra = [f"--after-cursor={mark}"] if mark else []
    return [str(e.get("MESSAGE")) for e in ns.journal("-u", "hydrogate-probe.service", *extra)]


def test_the_sandbox_is_enforced_and_the_model_runs_in_it(ns: SystemdNamespace) -> None:
    # A device of a major the unit does not list (5:1, the console) and one it does
    # (4:64, ttyS0, the Pi's mini UART), both 0666 so only the cgroup rule can refuse.
    for name, major, minor in (("hg-console", 5, 1), ("hg-ttyS", 4, 64)):
        ns.run(["rm", "-f", f"/dev/{name}"])
        ns.run(["mknod", "-m", "0666", f"/dev/{name}", "c", str(major), str(minor)])
    out = in_the_units_sandbox(ns, _PROBE)
    assert "console EPERM" in out, out  # DevicePolicy=closed
    assert not [line for line in out if line.startswith("ttyS EPERM")], out  # DeviceAllow=
    assert "wx EACCES" in out or "wx EPERM" in out, out  # MemoryDenyWriteExecute=
    # The TFLite runtime loads and runs the model all the same.
    assert any(line.startswith("model tflite_runtime.interpreter {") for line in out), out
    assert not [line for line in out if "Error in cpuinfo" in line], out


def test_journal_lines_carry_their_fields(ns: SystemdNamespace) -> None:
    got = entries(ns, "NODE=tank-a")
    assert got, "no line with NODE=tank-a"
    up = [e for e in got if "link up" in str(e.get("MESSAGE"))]
    assert up and up[-1]["PRIORITY"] == "6" and up[-1]["SYSLOG_IDENTIFIER"] == "hydrogate"
    # Every line the daemon wrote has upper-case fields only; journald drops the others.
    for e in entries(ns, "SYSLOG_IDENTIFIER=hydrogate"):
        assert "LOGGER" in e and "CODE_FUNC" in e


def _tids(host_pid: int) -> dict[int, int]:
    """Thread ids of a process as its namespace sees them -> as this machine sees them."""
    tids = {}
    for task in Path(f"/proc/{host_pid}/task").iterdir():
        status = (task / "status").read_text()
        nspid = next(line.split()[1:] for line in status.splitlines()
                     if line.startswith("NSpid:"))
        tids[int(nspid[-1])] = int(nspid[0])
    return tids


def _host_pid(ns: SystemdNamespace, ns_pid: int) -> int:
    """The machine's pid of the namespace's process ``ns_pid``."""
    mine = os.readlink(f"/proc/{ns.pid}/ns/pid")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.readlink(proc / "ns" / "pid") != mine:
                continue
            status = (proc / "status").read_text()
        except OSError:
            continue
        nspid = next(line.split()[1:] for line in status.splitlines()
                     if line.startswith("NSpid:"))
        if int(nspid[-1]) == ns_pid:
            return int(nspid[0])
    raise AssertionError(f"no process {ns_pid} in the namespace")


def _writer_tid(host_pid: int) -> int:
    """The machine's thread id of the store's writer thread ("hydrogate-store"), by py-spy."""
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
    done = subprocess.run([spy, "dump", "--json", "--pid", str(host_pid)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    tids = _tids(host_pid)
    for thread in json.loads(done.stdout):
        if thread.get("thread_name") == "hydrogate-store":
            tid = int(thread["os_thread_id"])
            return tid if tid in tids.values() else tids[tid]
    raise AssertionError(f"no hydrogate-store thread in {done.stdout[:500]}")


_TRACER = """
import ctypes, ctypes.util, sys
libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
tid = int(sys.argv[1])
for op in (0x4206, 0x4207):  # PTRACE_SEIZE, PTRACE_INTERRUPT: the thread stops, alone
    if libc.ptrace(op, tid, None, None) != 0:
        sys.exit(f"ptrace {op:#x}: errno {ctypes.get_errno()}")
print("stopped", flush=True)
sys.stdin.read()  # until the test lets go; exiting detaches (and reaps) the thread
"""


def _hang_thread(tid: int) -> subprocess.Popen[str]:
    """Stop one thread of another process, as a thread stuck in user space would be.

    The tracer is a process of its own so that letting go is its exit, which
    also releases the thread if it was killed meanwhile (a traced thread that
    dies waits for its tracer).
    """
    proc = subprocess.Popen([sys.executable, "-c", _TRACER, str(tid)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "stopped", line
    return proc


def test_the_watchdog_restarts_a_service_whose_store_writer_hangs(ns: SystemdNamespace) -> None:
    dropin(ns, "RestartSec=1\nDeviceAllow=char-pts rw\nWatchdogSec=3\n")
    ns.systemctl("restart", UNIT)
    before = ns.show(UNIT, "MainPID", "NRestarts", "WatchdogUSec")
    assert before["WatchdogUSec"] == "3s"
    pid = int(before["MainPID"])
    time.sleep(4)  # longer than WatchdogSec: the pings keep a healthy service alive
    assert ns.show(UNIT, "MainPID")["MainPID"] == str(pid)

    mark = cursor(ns)
    tid = _writer_tid(_host_pid(ns, pid))
    tracer = _hang_thread(tid)  # the event loop runs on; only the writer thread is stuck
    try:
        ns.wait_for("the watchdog", lambda: [
            e for e in since(ns, mark) if "Watchdog timeout" in str(e.get("MESSAGE"))
        ], timeout=30)
    finally:
        # systemd gave up on the service and sent WatchdogSignal (SIGABRT). A thread
        # held by ptrace would hold up the process's exit too (its core dump waits for
        # every thread), which a thread merely stuck in user space does not: let go.
        assert tracer.stdin is not None
        tracer.stdin.close()
        tracer.wait(timeout=30)
    now = ns.wait_for("a restart", lambda: (
        s if (s := ns.show(UNIT, "MainPID", "NRestarts", "ActiveState"))["MainPID"]
        not in ("0", str(pid)) and s["ActiveState"] == "active" else None
    ), timeout=60)
    assert int(now["NRestarts"]) == int(before["NRestarts"]) + 1
    text = "\n".join(str(e.get("MESSAGE")) for e in since(ns, mark))
    assert "has not answered" in text  # the daemon said why it withheld the pings
    assert "Watchdog timeout" in text  # systemd's own line
    assert "gateway/store.py" in text  # faulthandler: where each thread was at SIGABRT


def test_reload_fails_for_a_refused_file_and_the_old_config_keeps_running(
    ns: SystemdNamespace, tls: tuple[int, Path], pty_node: str
) -> None:
    dropin(ns, "RestartSec=1\nDeviceAllow=char-pts rw\n")
    good = config(pty_node, tls[0])
    write_config(ns, good)
    ns.systemctl("restart", UNIT)
    pid = ns.show(UNIT, "MainPID")["MainPID"]

    bad = yaml.safe_dump(good).replace("ph_setpoint: 6.0", "ph_setpoint: 12")
    assert "ph_setpoint: 12" in bad
    write_config(ns, bad)
    done = ns.systemctl("reload", UNIT, check=False)
    assert done.returncode != 0
    state = ns.show(UNIT, "MainPID", "ActiveState")
    assert state == {"MainPID": pid, "ActiveState": "active"}
    assert any("nodes[0].control.ph_setpoint" in m for m in messages(ns, "-n", "30"))

    # Signalled directly (no ExecReload check), the daemon refuses too and says so.
    ns.systemctl("kill", "-s", "HUP", "--kill-whom=main", UNIT)
    status = ns.wait_for("STATUS", lambda: (
        t if (t := ns.show(UNIT, "StatusText")["StatusText"]).startswith("reload refused") else ""
    ), timeout=20)
    assert "nodes[0].control.ph_setpoint" in status

    good["gateway"]["health_interval"] = 2
    write_config(ns, good)
    ns.systemctl("reload", UNIT)
    ns.wait_for("applied", lambda: ns.show(UNIT, "StatusText")["StatusText"].startswith(
        "1/1 nodes up"), timeout=20)
    assert ns.show(UNIT, "MainPID")["MainPID"] == pid


def test_a_config_it_cannot_run_is_not_restarted(ns: SystemdNamespace, pty_node: str,
                                                  tls: tuple[int, Path]) -> None:
    ns.systemctl("stop", UNIT)
    dropin(ns, "RestartSec=1\nDeviceAllow=char-pts rw\n")
    ns.systemctl("reset-failed", UNIT, check=False)
    # A folder the service's user cannot write: a clear error from check-config...
    ns.run(["install", "-d", "-m", "0755", "/var/lib/elsewhere"])
    data = config(pty_node, tls[0])
    data["storage"]["path"] = "/var/lib/elsewhere/hydrogate.sqlite"
    write_config(ns, data)
    check = ns.run(["runuser", "-u", "hydrogate", "--", "hydrogate", "check-config",
                    "-c", "/etc/hydrogate/config.yaml"], check=False)
    assert check.returncode == 2
    assert "storage.path: user hydrogate cannot write the folder /var/lib/elsewhere" in check.stderr
    root = ns.run(["hydrogate", "check-config", "-c", "/etc/hydrogate/config.yaml"], check=False)
    assert root.returncode == 2, "root's own check must speak for the service's user"
    assert "user hydrogate cannot write the folder /var/lib/elsewhere" in root.stderr

    # ... and from the service: exit 2, one clear line, no traceback, no restart.
    mark = cursor(ns)
    assert ns.systemctl("start", UNIT, check=False).returncode != 0
    time.sleep(3)  # three times RestartSec
    state = ns.show(UNIT, "ActiveState", "NRestarts", "ExecMainStatus", "Result")
    assert state == {"ActiveState": "failed", "NRestarts": "0", "ExecMainStatus": "2",
                     "Result": "exit-code"}
    lines = since(ns, mark)
    text = "\n".join(str(e.get("MESSAGE")) for e in lines)
    assert "Traceback" not in text
    errors = [e for e in lines if e.get("PRIORITY") == "3" and "cannot start" in str(e["MESSAGE"])]
    assert errors and "/var/lib/elsewhere" in str(errors[0]["MESSAGE"])

    # A YAML mistake: the same.
    write_config(ns, "gateway: {name: gw}\nstorage: {path: /var/lib/hydrogate/h.sqlite}\n"
                     "nodes: [{name: tank-a, url: 'tcp://127.0.0.1:1', poll_interval: -1}]\n")
    ns.systemctl("reset-failed", UNIT)
    assert ns.systemctl("start", UNIT, check=False).returncode != 0
    time.sleep(3)
    assert ns.show(UNIT, "NRestarts", "ExecMainStatus") == {"NRestarts": "0",
                                                            "ExecMainStatus": "2"}
    assert any("nodes[0].poll_interval" in m for m in messages(ns, "-p", "err", "-n", "5"))
    write_config(ns, config(pty_node, tls[0]))
    ns.systemctl("reset-failed", UNIT)


def _release_of(ns: SystemdNamespace) -> str:
    pid = ns.show(UNIT, "MainPID")["MainPID"]
    cmdline = ns.path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return cmdline[0].decode().split("/releases/")[1].split("/")[0]


def test_upgrade_swaps_the_release_and_a_failed_one_leaves_the_old_running(
    ns: SystemdNamespace, tmp_path: Path
) -> None:
    dropin(ns, "RestartSec=1\nDeviceAllow=char-pts rw\n")
    ns.systemctl("start", UNIT)
    first = _release_of(ns)
    time.sleep(1.1)  # releases are named by the second
    done = install(ns, "--upgrade")
    assert done.returncode == 0, done.stdout + done.stderr
    second = _release_of(ns)
    assert second != first
    assert ns.run(["readlink", "/opt/hydrogate/venv"]).stdout.strip() == f"releases/{second}"

    # A release that cannot run: check-config passes, the daemon dies at start, just after
    # migrating the buffer to a schema the running release does not know.
    broken = tmp_path / "broken"
    shutil.copytree(REPO, broken, ignore=shutil.ignore_patterns(".git", ".venv", ".cache",
                                                                "*.egg-info", "__pycache__"))
    storefile = broken / "gateway" / "storefile.py"
    text = storefile.read_text()
    for old, new in (
        (f"SCHEMA_VERSION = {SCHEMA_VERSION}\n", f"SCHEMA_VERSION = {SCHEMA_VERSION + 1}\n"),
        ("_MIGRATIONS: Mapping[int, str] = {",
         f"_MIGRATIONS: Mapping[int, str] = {{{SCHEMA_VERSION}: 'CREATE TABLE newer (x);', "),
        ("_DOWNGRADES: Mapping[int, Callable[[sqlite3.Connection], int]] = {",
         "_DOWNGRADES: Mapping[int, Callable[[sqlite3.Connection], int]] = {"
         f"{SCHEMA_VERSION + 1}: lambda conn: conn.execute('DROP TABLE newer').rowcount * 0, "),
        ("        _upgrade(conn, path)\n", "        _upgrade(conn, path)\n        os._exit(1)\n"),
        ("import contextlib\n", "import contextlib\nimport os\n"),
    ):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    storefile.write_text(text)
    time.sleep(1.1)
    done = install(ns, "--upgrade", src=broken)
    assert done.returncode != 0
    assert "previous release" in done.stderr
    assert ns.show(UNIT, "ActiveState")["ActiveState"] == "active"
    assert (f"written back from schema version {SCHEMA_VERSION + 1} to {SCHEMA_VERSION}"
            in done.stdout), done.stdout
    assert _release_of(ns) == second
    assert ns.run(["readlink", "/opt/hydrogate/venv"]).stdout.strip() == f"releases/{second}"
    kept = sorted(ns.run(["ls", "/opt/hydrogate/releases"]).stdout.split())
    assert kept == sorted([first, second])


def test_uninstall_asks_what_to_do_with_the_data(ns: SystemdNamespace) -> None:
    script = str(REPO / "scripts" / "uninstall.sh")
    done = ns.run([script], check=False)
    assert done.returncode == 2 and ns.path("/opt/hydrogate/venv").exists()

    db = ns.path("/var/lib/hydrogate/hydrogate.sqlite")
    assert db.exists()
    ns.run([script, "--keep-data"])
    assert not ns.path("/opt/hydrogate").exists()
    assert not ns.path(f"/etc/systemd/system/{UNIT}").exists()
    assert ns.path("/etc/hydrogate/config.yaml").exists() and db.exists()
    counters = ns.run(["/usr/bin/python3", "-c", (  # the buffer is intact, readings and all
        "import sqlite3; c = sqlite3.connect('/var/lib/hydrogate/hydrogate.sqlite');"
        "print(c.execute(\"SELECT value FROM meta WHERE key = 'received'\").fetchone()[0])")])
    assert int(counters.stdout) > 0
    assert ns.run(["id", "hydrogate"], check=False).returncode == 0

    ns.run([script, "--purge"])
    assert not ns.path("/etc/hydrogate").exists() and not ns.path("/var/lib/hydrogate").exists()
    assert ns.run(["id", "hydrogate"], check=False).returncode != 0
