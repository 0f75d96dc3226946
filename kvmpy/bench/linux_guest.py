"""The guest's half of ``kvmpy bench linux``, and what the host makes of its console.

The benchmark's root disk (kvmpy.images.rootfs with python3 and Debian's iperf3) carries
two files of ours. ``/etc/rc.local`` (run at the end of the disk's rcS, so after the
network is up) prints the boot marker, then measures, printing one console line per
result, each starting with :data:`MARK`:

    kvmpy-bench: boot 42                                   the shell computed 6 * 7
    kvmpy-bench: dd-write bytes=268435456 seconds=0.91 rc=0
    kvmpy-bench: dd-read bytes=268435456 seconds=0.52 rc=0
    kvmpy-bench: iperf-up | [  5] 0.00-5.00 sec ... receiver   iperf3's own lines, tagged
    kvmpy-bench: iperf-down | ...                          the same with -R (host to guest)
    kvmpy-bench: tcp-0 | Tcp: RtoAlgorithm ...             /proc/net/snmp and netstat's Tcp lines,
                                                           before, between and after the transfers
    kvmpy-bench: vsock-listening port=5000                 the host connects now
    kvmpy-bench: done

``/root/kvmpy-bench.py`` (Debian's python3 in the guest) times a command with the guest's
monotonic clock (busybox's date has no sub-second field) and echoes one vsock connection.
The parameters (MiB for dd, seconds and port for iperf3, the vsock port) come on the kernel
command line as ``kvmpy_bench=MIB,SECONDS,IPERF_PORT,VSOCK_PORT``, so one cached disk serves
every run. The parsers here are pure: tests feed them text.
"""
from __future__ import annotations

import re
import statistics

MARK = "kvmpy-bench:"
BOOT_VALUE = "42"
#: Debian packages the benchmark's disk adds to rootfs.build(python=True), which brings libc6 and libssl3.
PACKAGES = ("iperf3", "libiperf0", "libsctp1")

RC_LOCAL = f"""#!/bin/sh
# kvmpy bench linux, the guest's side: the boot marker, then disk, network and vsock.
echo "{MARK} boot $((6 * 7))"
set -- $(tr ' ' '\\n' < /proc/cmdline | sed -n 's/^kvmpy_bench=//p' | tr , ' ')
mib=$1 secs=$2 iport=$3 vport=$4
b=/root/kvmpy-bench.py
python3 $b time dd-write $((mib << 20)) dd if=/dev/zero of=/dev/vdb bs=1M count=$mib oflag=direct
python3 $b time dd-read $((mib << 20)) dd if=/dev/vdb of=/dev/null bs=1M count=$mib iflag=direct
gw=$(ip route | awk '$1 == "default" {{print $3; exit}}')
# a stalled transfer must not stall the run: iperf3 gets its seconds and half a minute more
iperf() {{ timeout $((secs + 30)) iperf3 -c "$gw" -p $iport -t $secs -f m "$@" 2>&1 || echo "iperf3: status $?"; }}
# the guest's TCP counters around each transfer (retransmissions, timeouts, out-of-order arrivals)
tcp() {{ grep -h -e '^Tcp:' -e '^TcpExt:' /proc/net/snmp /proc/net/netstat | sed "s/^/{MARK} tcp-$1 | /"; grep eth0: /proc/net/dev | sed "s/^/{MARK} tcp-$1 | /"; }}
tcp 0
iperf | sed 's/^/{MARK} iperf-up | /'
tcp 1
iperf -R | sed 's/^/{MARK} iperf-down | /'
tcp 2
python3 $b vsock-echo $vport
echo "{MARK} done"
reboot -f
"""

HELPER = f'''"""kvmpy bench linux's guest helper: time a command, echo one vsock connection."""
import socket
import subprocess
import sys
import time


def timed(label, nbytes, argv):
    t = time.monotonic()
    r = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    took = time.monotonic() - t
    why = r.stderr.decode(errors="replace").strip().replace("\\n", "; ") if r.returncode else ""
    print(f"{MARK} {{label}} bytes={{nbytes}} seconds={{took:.6f}} rc={{r.returncode}} {{why}}".rstrip(), flush=True)


def vsock_echo(port):
    try:
        s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        s.bind((socket.VMADDR_CID_ANY, port))
        s.listen(1)
    except OSError as e:
        print(f"{MARK} vsock-unavailable {{e}}", flush=True)
        return
    print(f"{MARK} vsock-listening port={{port}}", flush=True)
    s.settimeout(120)
    c, _ = s.accept()
    while data := c.recv(65536):
        c.sendall(data)


if sys.argv[1] == "time":
    timed(sys.argv[2], sys.argv[3], sys.argv[4:])
else:
    vsock_echo(int(sys.argv[2]))
'''


def guest_files() -> dict:
    """The files rootfs.build(files=...) adds: rc.local (executable) and the helper."""
    return {"etc/rc.local": (RC_LOCAL.encode(), 0o755), "root/kvmpy-bench.py": HELPER.encode()}


def cmdline_parameter(mib: int, seconds: int, iperf_port: int, vsock_port: int) -> str:
    return f"kvmpy_bench={mib},{seconds},{iperf_port},{vsock_port}"


# --- reading the console -----------------------------------------------------------------
class ParseError(ValueError):
    """A result line is missing or says the measurement failed; the message says which."""


def tagged(lines: list[str], tag: str) -> list[str]:
    """The text after ``MARK tag`` on each console line that has it (anywhere on the line:
    a kernel message may precede it)."""
    key = f"{MARK} {tag}"
    return [line[line.index(key) + len(key):].strip() for line in lines if key in line]


_TIMED = re.compile(r"bytes=(\d+) seconds=([0-9.]+(?:e-?\d+)?) rc=(-?\d+)(.*)")


def parse_timed(text: str) -> float:
    """MB/s (10^6 bytes per second) from the helper's ``bytes=N seconds=S rc=0`` line."""
    m = _TIMED.fullmatch(text.strip())
    if m is None:
        raise ParseError(f"not a timed result: {text!r}")
    nbytes, seconds, rc = int(m.group(1)), float(m.group(2)), int(m.group(3))
    if rc != 0:
        raise ParseError(f"dd failed (status {rc}): {m.group(4).strip() or 'no message'}")
    if seconds <= 0 or nbytes <= 0:
        raise ParseError(f"no time or no bytes: {text!r}")
    return nbytes / seconds / 1e6


_IPERF = re.compile(r"\[\s*\d+\]\s+[0-9.]+-[0-9.]+\s+sec\s+[0-9.]+\s+[KMGT]?Bytes\s+"
                    r"([0-9.]+)\s+([KMGT]?)bits/sec.*\breceiver\s*$")
_SCALE = {"": 1e-6, "K": 1e-3, "M": 1.0, "G": 1e3, "T": 1e6}


def parse_iperf3(lines: list[str]) -> float:
    """Mbit/s from iperf3's summary line for the receiving side (``... receiver``); ParseError,
    with iperf3's own last words, when there is none (e.g. ``unable to connect to server``)."""
    for line in lines:
        m = _IPERF.search(line)
        if m:
            return float(m.group(1)) * _SCALE[m.group(2)]
    said = "; ".join(line for line in lines if line.strip())[-300:]
    raise ParseError(f"iperf3 printed no receiver summary: {said or 'nothing'}")


#: The guest's TCP counters kept for each transfer: segments it retransmitted, retransmission
#: timeouts, segments that arrived out of order (a hint of frames lost on the way in), and
#: what its eth0 received and sent (/proc/net/dev: frames that arrived more than once, when
#: a sender went back to a lost segment, show as received bytes well above the throughput).
TCP_COUNTERS = ("RetransSegs", "TCPTimeouts", "TCPOFOQueue", "eth0_rx_bytes", "eth0_rx_frames", "eth0_tx_frames")


def parse_tcp_counters(lines: list[str]) -> dict[str, int]:
    """``{name: value}`` from /proc/net/snmp- and netstat-style pairs of lines (``Tcp: A B``
    then ``Tcp: 1 2``); a header without its values line is ignored."""
    counters, header = {}, {}
    for line in lines:
        if line.strip().startswith("eth0:"):          # /proc/net/dev: rx bytes, packets, ..., tx bytes, packets
            words = line.split(":", 1)[1].split()
            if len(words) >= 10 and all(w.isdigit() for w in words):
                counters.update(eth0_rx_bytes=int(words[0]), eth0_rx_frames=int(words[1]),
                                eth0_tx_frames=int(words[9]))
            continue
        prefix, _, rest = line.strip().partition(" ")
        words = rest.split()
        if words and all(w.lstrip("-").isdigit() for w in words) and prefix in header:
            counters.update(zip(header.pop(prefix), map(int, words)))
        elif words:
            header[prefix] = words
    return counters


def tcp_deltas(lines: list[str]) -> dict[str, dict[str, int]]:
    """The TCP_COUNTERS' growth during the guest-to-host ("up") and host-to-guest ("down")
    transfers, from the guest's ``tcp-0``/``tcp-1``/``tcp-2`` lines (missing ones: left out)."""
    snaps = [parse_tcp_counters(tagged(lines, f"tcp-{i} |")) for i in range(3)]
    out = {}
    for name, (a, b) in (("up", (snaps[0], snaps[1])), ("down", (snaps[1], snaps[2]))):
        out[name] = {k: b[k] - a[k] for k in TCP_COUNTERS if k in a and k in b}
    return out


# --- the result: medians, ratios, targets, table -------------------------------------------
#: metric -> (unit, title, better, target ratio kvmpy/QEMU or None). "lower": a ratio at or below
#: the target meets it; "higher": at or above.
METRICS = {
    "boot_to_shell": ("s", "boot to a shell command's output", "lower", 1.0),
    "disk_write": ("MB/s", "disk sequential write (dd, O_DIRECT)", "higher", 0.8),
    "disk_read": ("MB/s", "disk sequential read (dd, O_DIRECT)", "higher", 0.8),
    "net_guest_to_host": ("Mbit/s", "network guest to host (iperf3 via passt)", "higher", 0.8),
    "net_host_to_guest": ("Mbit/s", "network host to guest (iperf3 -R via passt)", "higher", 0.8),
    "vsock_rtt": ("us", "vsock round trip (64 bytes, median)", "lower", None),
}


def target_met(metric: str, ratio: float | None) -> bool | None:
    """Whether ``ratio`` (kvmpy/QEMU) meets the metric's target; None without a ratio or target."""
    _, _, better, target = METRICS[metric]
    if ratio is None or target is None:
        return None
    return ratio <= target if better == "lower" else ratio >= target


def summarize(samples: dict, missing: dict, variants: tuple[str, str]) -> dict:
    """Per metric: each variant's median (or its n/a reason), the ratio of the first variant
    to the second, and the target's verdict. ``samples[metric][variant]`` is a list of values,
    ``missing[metric][variant]`` the reason there are none."""
    out = {}
    for metric, (unit, title, better, target) in METRICS.items():
        row = {"unit": unit, "title": title, "better": better, "target": target, "medians": {}, "n_a": {}}
        for v in variants:
            values = samples.get(metric, {}).get(v, [])
            if values:
                row["medians"][v] = statistics.median(values)
            else:
                row["n_a"][v] = missing.get(metric, {}).get(v, "not measured")
        a, b = (row["medians"].get(v) for v in variants)
        row["ratio"] = a / b if a is not None and b else None
        row["met"] = target_met(metric, row["ratio"])
        out[metric] = row
    return out


def _cell(row: dict, variant: str) -> str:
    if variant in row["medians"]:
        return f"{row['medians'][variant]:.4g}"
    return f"n/a: {row['n_a'][variant]}"


def table_rows(summary: dict, variants: tuple[str, str]) -> list[list[str]]:
    rows = []
    for metric, row in summary.items():
        ratio = "n/a" if row["ratio"] is None else f"{row['ratio']:.3f}"
        if row["target"] is None:
            target = "none"
        else:
            target = f"{'<=' if row['better'] == 'lower' else '>='} {row['target']}"
        met = {True: "yes", False: "NO", None: "-"}[row["met"]]
        rows.append([f"{metric} ({row['unit']})", *(_cell(row, v) for v in variants), ratio, target, met])
    return rows
