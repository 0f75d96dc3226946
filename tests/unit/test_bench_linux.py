"""kvmpy bench linux, the parts that run anywhere: the parsers of the guest's console lines
(dd timed by the guest's helper, iperf3's summary), the summary with its ratios and targets,
the table, the options, and the two VMMs' command lines (the same boot for both).

The benchmark itself needs a KVM that runs guest ring 0 (the nested testbed:
``python tests/nested/testbed.py --steps linuxbench``); its refusal elsewhere is tested in
tests/integration/test_benchmarks.py.
"""
import argparse
import pathlib
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from kvmpy.bench import _common, linux, linux_guest
from kvmpy.bench.linux_guest import ParseError, parse_iperf3, parse_timed, tagged

#: iperf3 3.12's client output (Debian bookworm), as the guest prints it, the last lines.
IPERF3_UP = """Connecting to host 192.0.2.1, port 5201
[  5] local 192.0.2.2 port 40512 connected to 192.0.2.1 port 5201
[ ID] Interval           Transfer     Bitrate         Retr  Cwnd
[  5]   0.00-1.00   sec   63.4 MBytes   531 Mbits/sec    0   2.15 MBytes
- - - - - - - - - - - - - - - - - - - - - - - - -
[ ID] Interval           Transfer     Bitrate         Retr
[  5]   0.00-2.00   sec   127 MBytes   533 Mbits/sec    0             sender
[  5]   0.00-2.01   sec   126 MBytes   527 Mbits/sec                  receiver

iperf Done.""".splitlines()


# --- dd, timed by the guest's helper ------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.integers(1, 1 << 40), st.floats(1e-6, 1e5, allow_nan=False))
def test_a_timed_line_gives_mb_per_second(nbytes, seconds):
    line = f"bytes={nbytes} seconds={seconds:.6f} rc=0"
    assert parse_timed(line) == pytest.approx(nbytes / float(f"{seconds:.6f}") / 1e6)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 255), st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")), max_size=60))
def test_a_failed_dd_is_an_error_with_its_message(rc, said):
    with pytest.raises(ParseError, match=f"dd failed \\(status {rc}\\)"):
        parse_timed(f"bytes=1048576 seconds=0.5 rc={rc} {said}")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_anything_else_is_a_parse_error_never_a_crash(text):
    try:
        assert parse_timed(text) > 0
    except ParseError:
        pass


def test_the_guest_helper_prints_what_the_parser_reads(tmp_path):
    """The helper file the disk carries, run here with this Python: its timed line parses, and a
    failing command's status and message reach the error."""
    helper = tmp_path / "kvmpy-bench.py"
    helper.write_text(linux_guest.HELPER)
    ok = subprocess.run([sys.executable, str(helper), "time", "dd-write", "4096", "true"],
                        capture_output=True, text=True, timeout=60).stdout
    assert parse_timed(tagged(ok.splitlines(), "dd-write")[0]) > 0
    bad = subprocess.run([sys.executable, str(helper), "time", "dd-read", "4096", "sh", "-c", "echo no disk >&2; exit 3"],
                         capture_output=True, text=True, timeout=60).stdout
    with pytest.raises(ParseError, match=r"status 3\): no disk"):
        parse_timed(tagged(bad.splitlines(), "dd-read")[0])


# --- iperf3 -------------------------------------------------------------------------------------
def test_iperf3_gives_the_receivers_rate():
    assert parse_iperf3(IPERF3_UP) == 527.0


@settings(max_examples=300, deadline=None)
@given(st.floats(0.01, 999.99, allow_nan=False), st.sampled_from(["", "K", "M", "G"]),
       st.sampled_from(["", "K", "M", "G"]), st.integers(1, 99), st.sampled_from(["sender", "receiver"]))
def test_iperf3_rates_in_any_unit_come_back_in_mbits(rate, unit, xfer_unit, stream, first):
    """The receiver's line wins wherever it is, in whatever unit iperf3 chose."""
    scale = {"": 1e-6, "K": 1e-3, "M": 1.0, "G": 1e3}[unit]
    other = "sender" if first == "receiver" else "receiver"
    lines = [f"[{stream:3d}]   0.00-5.00   sec   12.5 {xfer_unit}Bytes  {7.25:.2f} Mbits/sec    0   {first}",
             f"[{stream:3d}]   0.00-5.00   sec   12.5 {xfer_unit}Bytes  {rate:.2f} {unit}bits/sec        {other}"]
    expected = float(f"{rate:.2f}") * scale if other == "receiver" else 7.25
    assert parse_iperf3(lines) == pytest.approx(expected)


def test_iperf3_without_a_summary_says_what_iperf3_said():
    with pytest.raises(ParseError, match="unable to connect to server: Connection refused"):
        parse_iperf3(["iperf3: error - unable to connect to server: Connection refused"])
    with pytest.raises(ParseError, match="nothing"):
        parse_iperf3([])


def test_tagged_lines_are_found_behind_a_kernel_message():
    lines = ["[   12.3] random: crng init done kvmpy-bench: dd-read bytes=1 seconds=1 rc=0",
             "kvmpy-bench: iperf-up | [  5] x", "kvmpy-bench: iperf-down | y", "noise"]
    assert tagged(lines, "dd-read") == ["bytes=1 seconds=1 rc=0"]
    assert tagged(lines, "iperf-up |") == ["[  5] x"]
    assert tagged(IPERF3_UP, "iperf-up |") == []


# --- the summary, the table, the JSON --------------------------------------------------------------
def _summary(samples, missing=None):
    return linux_guest.summarize(samples, missing or {}, ("kvmpy", "qemu"))


def test_ratios_are_kvmpy_over_qemu_of_medians_and_targets_point_the_right_way():
    s = _summary({"boot_to_shell": {"kvmpy": [2.0, 9.0, 3.0], "qemu": [4.0, 3.0, 5.0]},
                  "disk_read": {"kvmpy": [70.0], "qemu": [100.0]},
                  "net_guest_to_host": {"kvmpy": [90.0], "qemu": [100.0]},
                  "vsock_rtt": {"kvmpy": [50.0], "qemu": [40.0]}})
    assert s["boot_to_shell"]["medians"] == {"kvmpy": 3.0, "qemu": 4.0}
    assert s["boot_to_shell"]["ratio"] == 0.75 and s["boot_to_shell"]["met"] is True
    assert s["disk_read"]["ratio"] == pytest.approx(0.7) and s["disk_read"]["met"] is False
    assert s["net_guest_to_host"]["met"] is True
    assert s["vsock_rtt"]["ratio"] == 1.25 and s["vsock_rtt"]["met"] is None      # no target
    assert s["disk_write"]["ratio"] is None and s["disk_write"]["n_a"] == {"kvmpy": "not measured",
                                                                           "qemu": "not measured"}


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(linux_guest.METRICS)), st.floats(0.01, 100, allow_nan=False))
def test_a_target_is_met_exactly_on_its_side_of_the_bound(metric, ratio):
    _, _, better, target = linux_guest.METRICS[metric]
    met = linux_guest.target_met(metric, ratio)
    if target is None:
        assert met is None
    else:
        assert met == (ratio <= target if better == "lower" else ratio >= target)
    assert linux_guest.target_met(metric, None) is None


def test_the_table_shows_ratios_targets_and_why_a_number_is_missing():
    samples = {m: {"kvmpy": [2.0], "qemu": [4.0]} for m in linux_guest.METRICS}
    samples["vsock_rtt"]["qemu"] = []
    missing = {"vsock_rtt": {"qemu": "no /dev/vhost-vsock on this host (modprobe vhost_vsock)"}}
    result = {"host": _common.host_info(), "summary": linux_guest.summarize(samples, missing, ("kvmpy", "qemu")),
              "params": {"kernel": "linux-image-test", "cpus": 1, "mem": 512 << 20, "rounds": 1, "disk_mib": 256,
                         "iperf_seconds": 5, "pings": 500, "variants": ["kvmpy", "qemu"]}}
    text = linux.table(result)
    rows = {line.split()[0]: line for line in text.splitlines()}
    assert "0.500" in rows["boot_to_shell"] and "<= 1.0" in rows["boot_to_shell"] and "yes" in rows["boot_to_shell"]
    assert ">= 0.8" in rows["disk_write"] and rows["disk_write"].endswith("NO")
    assert "n/a: no /dev/vhost-vsock on this host (modprobe vhost_vsock)" in rows["vsock_rtt"]
    assert rows["vsock_rtt"].split()[-3:] == ["n/a", "none", "-"]


# --- options and command lines ------------------------------------------------------------------
def _args(argv=()):
    return _common.build_parser(linux, None).parse_args(list(argv))


def test_the_defaults_and_sizes():
    a = _args()
    assert (a.rounds, a.mem, a.cpus, a.disk_mib, a.iperf_seconds, a.pings) == (3, 512 << 20, 1, 256, 5, 500)
    a = _args(["--mem", "1G", "--disk-mib", "64", "--rounds", "1"])
    assert (a.mem, a.disk_mib, a.rounds) == (1 << 30, 64, 1)
    with pytest.raises(SystemExit):
        _args(["--rounds", "0"])


def test_both_variants_boot_the_same_kernel_initrd_cmdline_and_disks(tmp_path):
    kernel = argparse.Namespace(vmlinux=tmp_path / "vmlinux")
    setup = argparse.Namespace(args=_args(["--cpus", "2"]), qemu="qemu-system-x86_64", qemu_vsock=None,
                               disk=argparse.Namespace(kernel=kernel, initrd=tmp_path / "initrd.cpio"),
                               cmdline=f"{linux.CMDLINE} {linux_guest.cmdline_parameter(256, 5, 5201, 5000)}")
    root, data = tmp_path / "root.img", tmp_path / "data.img"
    k = linux.kvmpy_argv(setup, root, data, tmp_path / "vsock")
    q = linux.qemu_argv(setup, root, data, 7)
    assert k[k.index("--cmdline") + 1] == q[q.index("-append") + 1] == setup.cmdline
    assert k[4] == q[q.index("-kernel") + 1] == str(kernel.vmlinux)
    assert k[k.index("--initrd") + 1] == q[q.index("-initrd") + 1] == str(tmp_path / "initrd.cpio")
    assert k[k.index("--cpus") + 1] == q[q.index("-smp") + 1] == "2"
    assert [x for x in k if x.endswith(".img")] == [str(root), str(data)]
    assert [x.split(",")[1] for x in q if x.startswith("id=d")] == [f"file={root}", f"file={data}"]
    assert "addr.type=fd,addr.str=7" in q[q.index("-netdev") + 1] and "-enable-kvm" in q
    assert "vhost-vsock-device,guest-cid=3" in q
    setup.qemu_vsock = "no /dev/vhost-vsock"
    assert not any("vsock" in x for x in linux.qemu_argv(setup, root, data, 7))


def test_the_guest_reads_its_parameters_from_the_command_line():
    assert linux_guest.cmdline_parameter(256, 5, 5201, 5000) == "kvmpy_bench=256,5,5201,5000"
    assert "kvmpy_bench=" in linux_guest.RC_LOCAL and "reboot -f" in linux_guest.RC_LOCAL
    files = linux_guest.guest_files()
    assert files["etc/rc.local"][1] == 0o755 and files["root/kvmpy-bench.py"] == linux_guest.HELPER.encode()
    compile(linux_guest.HELPER, "kvmpy-bench.py", "exec")


def test_refused_where_ring0_is_emulated(tmp_path, monkeypatch, capsys):
    """kvm_pvm faked into the loaded modules: exit 2 at once, saying why and where it runs; no disk
    is built and no JSON written."""
    monkeypatch.setattr("kvmpy.kvm.system.backend_modules", lambda: ["kvm", "kvm_pvm"])
    monkeypatch.setenv("KVMPY_CACHE", str(tmp_path / "cache"))
    assert linux.main(["--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "cannot run here: this host's KVM (kvm_pvm) emulates guest ring 0" in err
    assert "testbed.py --steps linuxbench" in err
    assert not (tmp_path / "x.json").exists() and not pathlib.Path(tmp_path / "cache").exists()


# --- the guest's TCP counters (informative) ------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.from_regex(r"[A-Z][A-Za-z]{1,12}", fullmatch=True), st.integers(-1, 1 << 40),
                       min_size=1, max_size=12),
       st.dictionaries(st.from_regex(r"[A-Z][A-Za-z]{1,12}", fullmatch=True), st.integers(0, 1 << 40), max_size=12))
def test_tcp_counters_pair_each_header_with_its_values(tcp, ext):
    lines = [f"Tcp: {' '.join(tcp)}", f"Tcp: {' '.join(map(str, tcp.values()))}"]
    if ext:
        lines += [f"TcpExt: {' '.join(ext)}", f"TcpExt: {' '.join(map(str, ext.values()))}"]
    assert linux_guest.parse_tcp_counters(lines) == {**tcp, **ext}
    assert linux_guest.parse_tcp_counters(lines[:1]) == {}      # a header alone gives nothing


def test_tcp_deltas_are_per_transfer():
    def snap(i, retrans, ofo):
        return [f"kvmpy-bench: tcp-{i} | Tcp: RtoMin RetransSegs", f"kvmpy-bench: tcp-{i} | Tcp: 200 {retrans}",
                f"kvmpy-bench: tcp-{i} | TcpExt: TCPTimeouts TCPOFOQueue", f"kvmpy-bench: tcp-{i} | TcpExt: 1 {ofo}"]
    lines = snap(0, 10, 5) + snap(1, 17, 5) + snap(2, 17, 905)
    assert linux_guest.tcp_deltas(lines) == {"up": {"RetransSegs": 7, "TCPTimeouts": 0, "TCPOFOQueue": 0},
                                             "down": {"RetransSegs": 0, "TCPTimeouts": 0, "TCPOFOQueue": 900}}
    assert linux_guest.tcp_deltas(snap(0, 1, 1)) == {"up": {}, "down": {}}
    runs = [{"variant": "kvmpy", "guest_tcp": linux_guest.tcp_deltas(lines)}, {"variant": "qemu", "guest_tcp": {}}]
    assert linux.tcp_lines(runs) == ["guest TCP, kvmpy up: RetransSegs=7 TCPTimeouts=0 TCPOFOQueue=0",
                                     "guest TCP, kvmpy down: RetransSegs=0 TCPTimeouts=0 TCPOFOQueue=900"]


def test_eth0_counters_come_from_proc_net_dev():
    dev = ["kvmpy-bench: tcp-1 |   eth0: 17602495   12742    0    0    0     0          0         0 12284204    8997"
           "    0    0    0     0       0          0"]
    assert linux_guest.parse_tcp_counters([d.split("| ", 1)[1] for d in dev]) == {
        "eth0_rx_bytes": 17602495, "eth0_rx_frames": 12742, "eth0_tx_frames": 8997}
    before = ["kvmpy-bench: tcp-0 |   eth0: 100 2 0 0 0 0 0 0 300 4 0 0 0 0 0 0"]
    assert linux_guest.tcp_deltas(before + dev)["up"] == {"eth0_rx_bytes": 17602395, "eth0_rx_frames": 12740,
                                                           "eth0_tx_frames": 8993}


# --- a run's console, and a run that ends early --------------------------------------------------
def _console(tmp_path, script: str, timeout: float = 30):
    log = open(tmp_path / "log", "w+b")
    return linux.Console([sys.executable, "-c", script], log, timeout)


def test_a_marker_cut_by_a_kernel_message_is_put_back_together(tmp_path):
    console = _console(tmp_path, "print('kvmpy-bench: vso[   51.528779] hrtimer: interrupt took 1 ns')\n"
                                 "print('ck-listening port=5000')")
    _, line = console.wait_for("kvmpy-bench: vsock-")
    assert line == "kvmpy-bench: vsock-listening port=5000"
    assert "[   51.528779] hrtimer: interrupt took 1 ns" in console.lines


def test_a_run_that_ends_early_keeps_what_it_measured_and_says_why(tmp_path):
    script = ("print('kvmpy-bench: boot 42'); print('kvmpy-bench: dd-write bytes=1000000 seconds=0.5 rc=0')\n"
              "print('[   80.123456] Kernel panic - not syncing: Fatal exception')")
    setup = argparse.Namespace(qemu_vsock=None, args=argparse.Namespace(pings=5))
    record = {"values": {}, "n_a": {}, "guest_tcp": {}}
    with pytest.raises(_common.BenchError, match="the guest's kernel crashed .*Kernel panic"):
        linux._drive(setup, "qemu", _console(tmp_path, script), tmp_path / "vsock", lambda text: None, record)
    assert record["values"]["disk_write"] == pytest.approx(2.0) and "boot_to_shell" in record["values"]
    assert "no dd-read line" in record["n_a"]["disk_read"]
