"""The benchmarks run end to end at tiny sizes and print the JSON they promise (no speed asserted)."""
import json
import os
import re
import shutil
import pathlib
import subprocess
import sys

import pytest

from kvmpy.images import guests
from . import lab

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Run the same kvmpy the tests imported (installed or built in place).
ENV = lab.CHILD_ENV


def run(argv, **kw):
    return subprocess.run([sys.executable, *argv], capture_output=True, timeout=300, env=ENV, **kw)


def check_shape(data: dict, name: str, variants: set, ratios: set) -> None:
    assert data["benchmark"] == name
    assert data["host"]["kvm_backends"] is not None
    assert {r["variant"] for r in data["results"]} == variants
    for r in data["results"]:
        assert set(r) == {"variant", "metric", "value", "unit"}
        assert r["value"] > 0
    assert set(data["ratios"]) >= ratios
    assert all(v > 0 for v in data["ratios"].values())


def test_exits_via_cli(tmp_path):
    """`kvmpy bench exits --json` prints only the JSON object: raw, native and python, with their ratios."""
    out = tmp_path / "exits.json"
    r = run(["-m", "kvmpy", "bench", "exits", "--exits", "200", "--rounds", "1", "--warmup", "20",
             "--json", "--out", str(out)], cwd="/")
    assert r.returncode == 0, r.stderr.decode()
    data = json.loads(r.stdout)
    check_shape(data, "exits", {"raw", "native", "python", "cffi-ioctl", "vcpu.run", "python-device"},
                {"native/raw", "python/raw"})
    assert {r["unit"] for r in data["results"]} == {"ns"}
    assert set(data["wall_ratios"]) == {"native/raw", "python/raw"}
    assert data["params"]["platform"].startswith("pc")           # raw gets kvmpy's irqchip and PIT too
    for v in ("native", "python"):      # the parts of the median round add up to its wall time
        sp = data["split"][v]
        assert sp["kvm_ns_per_exit"] + sp["vmm_ns_per_exit"] <= sp["wall_ns_per_exit"] + 1
        assert sp["run_overhead_us"] >= 0
    assert json.loads(out.read_text()) == data


def test_exits_refuses_numbers_that_do_not_add_up():
    """A round whose loop clock (KVM_RUN + VMM) exceeds its wall time is an error, not a ratio."""
    from kvmpy.bench import exits
    from kvmpy.bench._common import BenchError
    ok = exits._split("native", 100, 800_000, 100_000, 1_000_000, 1)
    assert ok["ns"] == 9_000 and ok["wall_ns"] == 10_000 and ok["run_overhead_us"] == 100
    with pytest.raises(BenchError, match="does not add up"):
        exits._split("native", 100, 852_800, 1_585_200, 868_000, 1)     # the numbers



def test_exits_all_via_cli(tmp_path):
    """`kvmpy bench exits --all` reports every exit kind: raw, native and python for the user-space
    kinds (with their ratios), one in-kernel number for cpuid, ioeventfd and nop."""
    from kvmpy.bench import exits
    out = tmp_path / "exits-all.json"
    r = run(["-m", "kvmpy", "bench", "exits", "--all", "--exits", "1000", "--rounds", "1", "--warmup", "20",
             "--hlt-exits", "3", "--json", "--out", str(out)], cwd="/")
    assert r.returncode == 0, r.stderr.decode()
    data = json.loads(r.stdout)
    user = {"pio-out", "pio-in", "mmio-write", "mmio-read", "hlt"}
    kernel = {"cpuid", "ioeventfd", "nop"}
    check_shape(data, "exits", {"raw", "native", "python", "kernel"},
                {f"{k} {v}/raw" for k in user for v in ("native", "python")})
    assert data["params"]["all"] is True
    assert {(x["metric"], x["variant"]) for x in data["results"]} == \
        {(k, v) for k in user for v in ("raw", "native", "python")} | {(k, "kernel") for k in kernel}
    assert set(exits.KINDS) == user | kernel and {x["unit"] for x in data["results"]} == {"ns"}
    assert set(data["split"]) == user and set(data["split"]["hlt"]) == {"native", "python"}
    assert b"pio-out" in r.stderr and b"ioeventfd" in r.stderr         # the table, on stderr with --json
    assert json.loads(out.read_text()) == data

def test_serial_via_cli(tmp_path):
    """`kvmpy bench serial` checks that every byte arrived and reports bytes/s and write() calls for both loops."""
    r = run(["-m", "kvmpy", "bench", "serial", "--bytes", "3000", "--rounds", "1", "--json",
             "--out", str(tmp_path / "serial.json")], cwd="/")
    assert r.returncode == 0, r.stderr.decode()
    data = json.loads(r.stdout)
    check_shape(data, "serial", {"native", "python"}, {"native/python"})
    calls = {x["variant"]: x["value"] for x in data["results"] if x["metric"] == "write_calls_per_mib"}
    assert 0 < calls["python"] < 1 << 20      # the console's writer batches even the Python UART's bytes


@pytest.mark.parametrize("virtio", ["mmio", "pci"])
def test_blk_via_runner(tmp_path, virtio):
    """benchmarks/blk.py on a 2 MiB disk: MB/s for host, native and python in every phase, and the
    1 MiB-read ratios, with the disk behind virtio-mmio or virtio-pci (the guest finds either)."""
    out = tmp_path / "blk.json"
    r = run([str(ROOT / "benchmarks" / "blk.py"), "--disk-size", "2M", "--rounds", "1", "--dir", str(tmp_path),
             "--virtio", virtio, "--json", "--out", str(out)], cwd=ROOT)
    assert r.returncode == 0, r.stderr.decode()
    data = json.loads(r.stdout)
    check_shape(data, "blk", {"host", "native", "python"}, {"native/host", "python/host", "native/python"})
    assert {x["unit"] for x in data["results"]} == {"MB/s"}
    metrics = {"seq-read-4K", "seq-write-4K", "seq-read-16K", "seq-write-16K", "seq-read-64K", "seq-write-64K",
               "seq-read-256K", "seq-write-256K", "seq-read-1M", "seq-write-1M", "rand-read-4K"}
    for v in ("host", "native", "python"):
        assert {x["metric"] for x in data["results"] if x["variant"] == v} == metrics
    assert data["params"]["phase_bytes"] == dict.fromkeys(metrics, 2 << 20)
    assert data["params"]["virtio"] == virtio
    assert {f"native/host {m}" for m in metrics} <= set(data["ratios"])
    requests = 3 * 512 + 2 * 128 + 2 * 32 + 2 * 8 + 2 * 2       # one queue notify (MMIO write) each
    assert all(data["guest_runs"][v]["mmio_writes"] >= requests for v in ("native", "python"))
    assert json.loads(out.read_text()) == data
    assert list(tmp_path.iterdir()) == [out]           # the scratch disk is gone


@pytest.mark.parametrize("script", ["exit_roundtrip.py", "exits.py"])
def test_exits_runner_scripts(script, tmp_path):
    """The thin runners in benchmarks/ take the benchmark's options and print its table."""
    r = run([str(ROOT / "benchmarks" / script), "--exits", "100", "--rounds", "1", "--warmup", "10",
             "--no-extras", "--out", str(tmp_path / "r.json")], cwd=ROOT)
    assert r.returncode == 0, r.stderr.decode()
    assert b"native/raw" in r.stdout
    assert {x["variant"] for x in json.loads((tmp_path / "r.json").read_text())["results"]} == \
        {"raw", "native", "python"}


def test_bench_lists_benchmarks_and_rejects_unknown_names():
    """`kvmpy bench` lists every benchmark; an unknown name is a usage error (2) with the list."""
    from kvmpy.bench import BENCHMARKS
    r = run(["-m", "kvmpy", "bench"], cwd="/")
    assert r.returncode == 0
    for name, mod in BENCHMARKS.items():
        assert name.encode() in r.stdout and mod.DESCRIPTION.encode() in r.stdout
    r = run(["-m", "kvmpy", "bench", "no-such-benchmark"], cwd="/")
    assert r.returncode == 2
    assert b"exits" in r.stdout + r.stderr


def test_bench_help_lists_benchmarks():
    """`kvmpy bench --help` lists every benchmark and exits 0."""
    from kvmpy.bench import BENCHMARKS
    r = run(["-m", "kvmpy", "bench", "--help"], cwd="/")
    assert r.returncode == 0
    assert all(mod.DESCRIPTION.encode() in r.stdout for mod in BENCHMARKS.values())


def test_bench_option_help():
    """`kvmpy bench serial --help` shows the benchmark's own options and exits 0."""
    r = run(["-m", "kvmpy", "bench", "serial", "--help"], cwd="/")
    assert r.returncode == 0
    assert b"--bytes" in r.stdout and b"--json" in r.stdout


def test_missing_compiler_is_exit_2(tmp_path):
    """Without the C compiler the exits benchmark stops with status 2 and says what is missing."""
    r = subprocess.run([sys.executable, "-m", "kvmpy", "bench", "exits", "--out", str(tmp_path / "x.json")],
                       capture_output=True, timeout=120, env={**ENV, "CC": "no-such-cc"}, cwd="/")
    assert r.returncode == 2
    assert b"no-such-cc" in r.stderr and b"not found" in r.stderr
    assert not (tmp_path / "x.json").exists()


def test_boot_via_cli(tmp_path):
    """`kvmpy bench boot` times the multiboot kernel to its exit in-process and as a CLI process, and QEMU where installed."""
    import shutil
    out = tmp_path / "boot.json"
    r = run(["-m", "kvmpy", "bench", "boot", "--rounds", "1", "--json", "--out", str(out)], cwd="/")
    assert r.returncode == 0, r.stderr.decode()
    data = json.loads(r.stdout)
    ran = {x["variant"] for x in data["results"]}
    qemu = {"qemu", "qemu-microvm"}
    if shutil.which("qemu-system-x86_64") is None:
        assert ran == {"kvmpy-lib", "kvmpy-cli"} and set(data["skipped"]) == qemu
        assert b"QEMU not used" in r.stderr
    else:                           # each QEMU variant ran, or says why not
        assert ran - qemu == {"kvmpy-lib", "kvmpy-cli"}
        assert all(data["skipped"][v] for v in qemu - ran)
    check_shape(data, "boot", ran, {"kvmpy-cli/kvmpy-lib"} | {f"{k}/{q}" for q in ran & qemu
                                                             for k in ("kvmpy-lib", "kvmpy-cli")})
    assert {(x["metric"], x["unit"]) for x in data["results"]} == {("to_exit", "ms")}
    assert set(data["split"]["kvmpy-lib"]) == {"machine_ms", "load_ms", "run_ms", "close_ms"}
    assert data["split"]["kvmpy-cli"]["python_startup_ms"] > 0
    assert data["outputs"]["kvmpy-lib"] == guests.get("multiboot-hello").expect_output.decode()
    assert json.loads(out.read_text()) == data


def test_boot_runner_without_qemu(tmp_path):
    """benchmarks/boot.py with no QEMU to be found says so on stderr and reports kvmpy alone (exit 0)."""
    out = tmp_path / "boot.json"
    r = run([str(ROOT / "benchmarks" / "boot.py"), "--qemu", "no-such-qemu", "--rounds", "1", "--no-extras",
             "--out", str(out)], cwd=ROOT)
    assert r.returncode == 0, r.stderr.decode()
    assert b"no-such-qemu not found" in r.stderr
    assert b"kvmpy-cli" in r.stdout and b"kvmpy-lib" in r.stdout
    data = json.loads(out.read_text())
    check_shape(data, "boot", {"kvmpy-lib", "kvmpy-cli"}, {"kvmpy-cli/kvmpy-lib"})
    assert set(data["ratios"]) == {"kvmpy-cli/kvmpy-lib"} and "kvmpy-cli" not in data["split"]


def test_boot_no_pc_skips_only_the_pc_variant(tmp_path):
    """`--no-pc` leaves out the qemu (-M pc) variant and says so in `skipped`."""
    import shutil
    out = tmp_path / "boot.json"
    r = run(["-m", "kvmpy", "bench", "boot", "--rounds", "1", "--no-pc", "--no-extras", "--out", str(out)], cwd="/")
    assert r.returncode == 0, r.stderr.decode()
    data = json.loads(out.read_text())
    assert "qemu" not in {x["variant"] for x in data["results"]}
    if shutil.which("qemu-system-x86_64") is not None:
        assert data["skipped"]["qemu"] == "--no-pc"


def test_boot_linux_without_a_kernel_is_exit_2(tmp_path):
    """`--subject linux` with an empty kernel cache and no apt says it cannot fetch the kernel (exit 2)."""
    env = {**ENV, "KVMPY_CACHE": str(tmp_path / "cache"), "PATH": str(tmp_path)}     # no apt-cache on PATH
    r = subprocess.run([sys.executable, "-m", "kvmpy", "bench", "boot", "--subject", "linux",
                        "--out", str(tmp_path / "x.json")], capture_output=True, timeout=120, env=env, cwd="/")
    assert r.returncode == 2, r.stderr.decode()
    assert b"subject linux skipped" in r.stderr and b"python -m kvmpy.images.linuxkernel" in r.stderr
    assert not (tmp_path / "x.json").exists()


def test_boot_linux_to_the_banner(tmp_path):
    """`--subject linux` boots Debian's PVH vmlinux to "Linux version " in-process and via the CLI
    (one round, no warm-up, no QEMU: ~30 s without hardware virtualisation, about 2 s with)."""
    from kvmpy import linuxkernel
    from kvmpy.bench import boot
    try:
        files = linuxkernel.fetch()
    except linuxkernel.FetchError as e:
        if os.environ.get("KVMPY_REQUIRE_KVM") == "1":
            pytest.fail(f"cannot fetch Debian's kernel: {e}")
        pytest.skip(f"cannot fetch Debian's kernel: {e}")
    out = tmp_path / "boot.json"
    r = run(["-m", "kvmpy", "bench", "boot", "--subject", "linux", "--rounds", "1", "--warmup", "0",
             "--no-qemu", "--no-extras", "--json", "--out", str(out)], cwd="/")
    assert r.returncode == 0, r.stderr.decode()
    data = json.loads(r.stdout)
    check_shape(data, "boot", {"kvmpy-lib", "kvmpy-cli"}, {"kvmpy-cli/kvmpy-lib"})
    assert {(x["metric"], x["unit"]) for x in data["results"]} == {("to_banner", "ms")}
    p = data["params"]
    assert (p["subject"], p["end"], p["mem"], p["rounds"], p["image"]) == \
        ("linux", "banner", 512 << 20, 1, str(files.vmlinux))
    assert p["commands"]["kvmpy-cli"][-5:] == ["--format", "pvh", "--cmdline", "console=ttyS0 earlyprintk=serial",
                                               str(files.vmlinux)]
    for v in ("kvmpy-lib", "kvmpy-cli"):
        assert "Linux version " in data["outputs"][v]
        assert data["banner_ms"][v] == data["results"][[x["variant"] for x in data["results"]].index(v)]["value"]
    # QEMU gets the same kernel and command line (not run here: another ~15 s a variant)
    args = boot._common.build_parser(boot, None).parse_args(["--subject", "linux"])
    args.mem = boot.SUBJECTS["linux"].mem
    runner = boot.Runner(boot.linux(args), args, "qemu-system-x86_64", None)
    assert runner.argv["qemu-microvm"][-8:] == ["-m", "512M", "-M", "microvm", "-kernel", str(files.vmlinux),
                                                "-append", "console=ttyS0 earlyprintk=serial"]
    assert runner.argv["qemu"][-6:-4] == ["-M", "pc"]


RING0_EMULATED = "kvm_pvm" in __import__("kvmpy.kvm.system", fromlist=["x"]).backend_modules()


@pytest.mark.skipif(not RING0_EMULATED, reason="this host's KVM does not emulate ring 0 (see the in-process test)")
def test_boot_linux_init_refuses_where_ring0_is_emulated(tmp_path):
    """`--subject linux-init` on a kvm_pvm host exits 2 at once, saying why Linux cannot reach init
    there and where it can run; it neither fetches a kernel (none cached, no apt) nor writes JSON."""
    env = {**ENV, "KVMPY_CACHE": str(tmp_path / "cache"), "PATH": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "kvmpy", "bench", "boot", "--subject", "linux-init",
                        "--out", str(tmp_path / "x.json")], capture_output=True, timeout=120, env=env, cwd="/")
    assert r.returncode == 2, r.stderr.decode()
    err = r.stderr.decode()
    assert "subject linux-init cannot run here" in err and "kvm_pvm" in err and "emulates guest ring 0" in err
    assert "testbed.py --steps bench" in err and "Traceback" not in err
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "cache").exists()


@pytest.mark.skipif(not RING0_EMULATED, reason="this host's KVM does not emulate ring 0 (tests/unit/test_bench_linux.py "
                                                "fakes it)")
def test_linux_refuses_where_ring0_is_emulated(tmp_path):
    """`kvmpy bench linux` on a kvm_pvm host exits 2 at once, saying why and where it runs; it builds
    no disk (no cache made) and writes no JSON."""
    env = {**ENV, "KVMPY_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "kvmpy", "bench", "linux", "--out", str(tmp_path / "x.json")],
                       capture_output=True, timeout=120, env=env, cwd="/")
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert "kvmpy bench linux: cannot run here: this host's KVM (kvm_pvm) emulates guest ring 0" in err
    assert "testbed.py --steps linuxbench" in err and "Traceback" not in err
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "cache").exists()


def test_boot_linux_init_refusal_in_process(tmp_path, monkeypatch, capsys):
    """The same refusal wherever the tests run, with kvm_pvm faked into the loaded modules."""
    from kvmpy.bench import boot
    monkeypatch.setattr("kvmpy.kvm.system.backend_modules", lambda: ["kvm", "kvm_pvm"])
    monkeypatch.setenv("KVMPY_CACHE", str(tmp_path / "cache"))
    assert boot.ring0_emulated() == ["kvm_pvm"]
    assert boot.main(["--subject", "linux-init", "--out", str(tmp_path / "x.json")]) == 2
    assert "subject linux-init cannot run here: this host's KVM (kvm_pvm) emulates guest ring 0" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "cache").exists()


def test_boot_linux_init_gives_every_variant_the_same_boot(tmp_path):
    """linux-init's kvmpy-lib load, kvmpy-cli and QEMU commands name the same kernel, initrd file,
    command line and memory (checked without a kernel: the paths need not exist)."""
    from kvmpy.bench import boot
    from kvmpy.images.linuxkernel import LinuxFiles
    files = LinuxFiles(tmp_path / "vmlinuz", tmp_path / "vmlinux", tmp_path / "busybox", "linux-image-test")
    args = boot._common.build_parser(boot, None).parse_args(["--subject", "linux-init", "--append", "quiet"])
    args.mem = boot.SUBJECTS["linux-init"].mem
    s = boot.linux_init_subject(files, tmp_path / "initrd.cpio", args.mem, args.append)
    cmdline = "console=ttyS0 earlyprintk=serial panic=-1 quiet"
    assert (s.end, s.metric, s.stop_at) == ("marker", "to_marker", "marker")
    assert list(s.marks) == ["banner", "run_init", "marker"] and s.marks["marker"] == b"kvmpy-init: 42"
    assert s.load == {"format": "pvh", "cmdline": cmdline, "initrd": str(tmp_path / "initrd.cpio")}
    runner = boot.Runner(s, args, "qemu-system-x86_64", None)
    kernel, initrd = str(files.vmlinux), str(tmp_path / "initrd.cpio")
    assert runner.argv["kvmpy-cli"][-9:] == ["--mem", str(512 << 20), "--format", "pvh", "--cmdline", cmdline,
                                             "--initrd", initrd, kernel]
    assert runner.argv["qemu-microvm"][-12:] == ["-m", "512M", "-M", "microvm,rtc=on", "-cpu", "host", "-kernel",
                                                 kernel, "-initrd", initrd, "-append", cmdline]
    stock = boot.linux_init_subject(files, tmp_path / "initrd.cpio", args.mem, microvm_rtc="auto")
    assert stock.qemu["qemu-microvm"][:2] == ("-M", "microvm") and "rtc=auto" in stock.note
    assert "-no-reboot" in runner.argv["qemu-microvm"]
    assert boot.LINUX_INIT_MARKER not in boot.LINUX_INIT_SCRIPT.encode()   # only a running shell prints it


def test_boot_marks_are_found_across_pieces():
    """The serial watcher finds each mark once, when its last byte arrives, however the output is cut."""
    from kvmpy.bench import boot
    out = b"noise Linux version 6.1 ...\r\nRun /init as init process\r\nkvmpy-init: 42\r\n"
    seen = []
    m = boot._Marks({"banner": b"Linux version ", "run_init": b"Run /init", "marker": b"kvmpy-init: 42"},
                    "marker", seen.append)
    stops = [m.feed(out[i:i + 1]) for i in range(len(out))]
    assert seen == ["banner", "run_init", "marker"]
    assert stops.index(True) == out.index(b"kvmpy-init: 42") + len(b"kvmpy-init: 42") - 1
    assert m.ns["banner"] <= m.ns["run_init"] <= m.ns["marker"] and bytes(m.buf) == out
    subject = boot.Subject(name="t", title="t", image=None, load={}, cli=(), qemu={}, banner=b"B", end="marker",
                           marker=b"M", splits=(("run_init", b"R"),))
    phases = boot._phases(subject, [{"banner_ms": 10.0, "run_init_ms": 25.0, "marker_ms": 26.0},
                                    {"banner_ms": 12.0, "run_init_ms": None, "marker_ms": 30.0}])
    assert phases == {"start-banner": 11.0, "banner-run_init": 15.0, "run_init-marker": 1.0,
                      "banner-marker": 18.0}


@pytest.mark.skipif(RING0_EMULATED, reason="Linux stops after its banner where KVM emulates ring 0 (kvm_pvm); "
                                           "the nested testbed runs this (--steps pytest or bench)")
def test_boot_linux_init_to_the_marker(tmp_path):
    """`--subject linux-init` boots Debian's kernel with the busybox initramfs to the line /init
    prints, in-process and via the CLI (one round, no warm-up, no QEMU), with its phases and exits."""
    from kvmpy import linuxkernel
    try:
        linuxkernel.fetch()
    except linuxkernel.FetchError as e:
        if os.environ.get("KVMPY_REQUIRE_KVM") == "1":
            pytest.fail(f"cannot fetch Debian's kernel: {e}")
        pytest.skip(f"cannot fetch Debian's kernel: {e}")
    out = tmp_path / "boot.json"
    path = os.pathsep.join(p for p in (ENV["PYTHONPATH"], os.environ.get("PYTHONPATH")) if p)   # L1: /opt/site
    r = subprocess.run([sys.executable, "-m", "kvmpy", "bench", "boot", "--subject", "linux-init", "--rounds", "1",
                        "--warmup", "0", "--no-qemu", "--no-extras", "--json", "--out", str(out)],
                       capture_output=True, timeout=300, env={**ENV, "PYTHONPATH": path}, cwd="/")
    assert r.returncode == 0, r.stderr.decode()
    data = json.loads(r.stdout)
    check_shape(data, "boot", {"kvmpy-lib", "kvmpy-cli"}, {"kvmpy-cli/kvmpy-lib"})
    assert {(x["metric"], x["unit"]) for x in data["results"]} == {("to_marker", "ms")}
    assert data["params"]["end"] == "marker" and data["params"]["marks"]["marker"] == "kvmpy-init: 42"
    for v in ("kvmpy-lib", "kvmpy-cli"):
        assert "kvmpy-init: 42" in data["outputs"][v] and "Run /init" in data["outputs"][v]
        marks = data["marks_ms"][v]
        assert 0 < marks["banner"] <= marks["run_init"] <= marks["marker"]
        assert set(data["phases_ms"][v]) == {"start-banner", "banner-run_init", "run_init-marker"}
    st = data["kvmpy_stats"]
    assert st["total_exits"] > 0 and list(st["at"]) == ["banner", "run_init", "marker"]
    assert 0 <= st["ram_host_offset_2m"] < 2 << 20
    assert b"phases" in r.stderr


def test_boot_without_warmup_skips_a_failing_qemu(tmp_path):
    """With --warmup 0 a QEMU that fails its first (timed) run is skipped with the reason, not an error."""
    import shutil
    false = shutil.which("false")
    out = tmp_path / "boot.json"
    r = run(["-m", "kvmpy", "bench", "boot", "--qemu", false, "--rounds", "2", "--warmup", "0", "--no-extras",
             "--out", str(out)], cwd="/")
    assert r.returncode == 0, r.stderr.decode()
    assert r.stderr.count(b"skipping qemu") == 2                  # qemu and qemu-microvm, once each
    data = json.loads(out.read_text())
    check_shape(data, "boot", {"kvmpy-lib", "kvmpy-cli"}, {"kvmpy-cli/kvmpy-lib"})
    assert set(data["skipped"]) == {"qemu", "qemu-microvm"}
    assert all("exit status 1" in why for why in data["skipped"].values())
    assert all(len(xs) == 2 for xs in data["samples"].values())


def test_snapshot_quick_via_cli(tmp_path):
    """`kvmpy bench snapshot --quick --json`: 64 MiB only; every timing, size, rate and migration
    figure is there and sane, the ratios are over the fresh boot, and no fd is left open."""
    out = tmp_path / "snapshot.json"
    r = run(["-m", "kvmpy", "bench", "snapshot", "--quick", "--rounds", "1", "--dir", str(tmp_path),
             "--json", "--out", str(out)], cwd="/")
    assert r.returncode == 0, r.stderr.decode()
    data = json.loads(r.stdout)
    keys = ("snapshot", "restore_verify", "restore", "restore_to_line", "clone", "migration_total",
            "migration_downtime")
    check_shape(data, "snapshot", {"64M"}, {f"{k}/fresh_boot 64M" for k in keys})
    p = data["params"]
    assert (p["sizes"], p["quick"], p["rounds"], p["clones"], p["migrations"]) == ([64 << 20], True, 1, 4, 1)
    val = {x["metric"]: x["value"] for x in data["results"]}
    assert set(val) == {"fresh_boot", *keys, "snapshot_disk", "clone_rate", "migration_rounds",
                        "migration_pages", "migration_sent"}
    disk = data["snapshot_disk"]["64M"]
    assert 64 << 20 < disk["apparent"] < 65 << 20                # one RAM file of the RAM's size + the manifest
    assert p["data"] <= disk["allocated"] < disk["apparent"]       # the host's data is there, zeros are holes
    c = data["clones"]["64M"]
    assert c["count"] == 4 and c["ram_total"] == 4 * (64 << 20)
    assert 0 <= c["private_dirty_ran"] < c["ram_total"] // 2      # copy-on-write: far below 4 x 64 MiB
    (mig,) = data["migration"]["64M"]
    assert mig["rounds"] >= 2 and mig["pages"] > 0 and 0 < mig["downtime_s"] < mig["total_s"]
    assert mig["received_pages"] == mig["pages"] + mig["zero_pages"] >= (64 << 20) // 4096
    assert re.fullmatch(r"count \d+ 0x[0-9a-f]+", mig["target_line"])   # the guest went on at the target
    assert data["fds_leaked"] == 0
    assert b"restore verify=False" in r.stderr                   # the table, on stderr with --json
    assert json.loads(out.read_text()) == data
    assert list(tmp_path.iterdir()) == [out]                     # the snapshots are gone


def test_reset_quick_via_cli(tmp_path):
    """`kvmpy bench reset --quick --json`: every dirty-page count in both dirty-log modes, its
    median, p99 and split, the pages copied (at least the count), the references and ratios."""
    out = tmp_path / "reset.json"
    r = run(["-m", "kvmpy", "bench", "reset", "--quick", "--cases", "6", "--pages", "1,16,all",
             "--mem", "16M", "--json", "--out", str(out)], cwd="/")
    assert r.returncode == 0, r.stderr.decode()
    data = json.loads(r.stdout)
    modes = ("get", "clear", "ioctls")
    variants = {f"{m} {c}" for m in modes for c in ("1", "16", "all")} | {"reference"}
    check_shape(data, "reset", variants, {"restore/reset get 16", "fresh_boot/reset clear 16"})
    for mode in modes:
        counts = data["modes"][mode]["counts"]
        assert counts["1"]["copied"] >= 1 and counts["16"]["copied"] >= 16
        assert counts["all"]["copied"] == (16 << 20) // 4096                # every page of RAM
        for d in counts.values():
            assert d["p99_us"] >= d["median_us"] > 0
            assert set(d["split_us"]) == {"pages", "vcpu", "irqchip", "devices", "disks"}
        ops = data["modes"][mode]["ops_us"]
        assert "KVM_SET_XSAVE" in ops and ("KVM_SET_REGS" in ops) == (mode == "ioctls")
    assert b"target median <= 50 us at 16 pages" in r.stderr
    assert json.loads(out.read_text()) == data


def test_sandbox_quick_via_cli(tmp_path):
    """`kvmpy bench sandbox --quick --json`: sandbox and fork latencies (median, p99) for the trivial
    and the 1 MiB call, create-call-destroy, pool calls per second, the split and the ratios."""
    out = tmp_path / "sandbox.json"
    r = run(["-m", "kvmpy", "bench", "sandbox", "--quick", "--calls", "8", "--creates", "2", "--pool-calls", "12",
             "--json", "--out", str(out)], cwd="/")
    assert r.returncode == 0, r.stderr.decode()
    data = json.loads(r.stdout)
    check_shape(data, "sandbox", {"sandbox", "fork"},
                {"fork/sandbox trivial", "fork/sandbox dirty", "fork/sandbox create-call-destroy",
                 "sandbox/fork pool calls_per_s"})
    metrics = {(x["variant"], x["metric"]) for x in data["results"]}
    for variant in ("sandbox", "fork"):
        assert {(variant, f"{k}_{s}") for k in ("trivial", "dirty") for s in ("median", "p99")} <= metrics
        assert (variant, "pool_calls_per_s") in metrics
    assert ("sandbox", "create_median") in metrics
    s = data["sandbox"]
    for k in ("trivial", "dirty", "create"):
        assert s[k]["p99_us"] >= s[k]["median_us"] > 0
    assert set(s["split_us"]) == {"run", "host", "reset", "pages", "vcpu", "irqchip", "devices", "disks"}
    assert b"target: trivial call + reset median <= 100 us" in r.stderr
    assert json.loads(out.read_text()) == data


@pytest.mark.skipif(shutil.which("afl-fuzz") is None, reason="afl-fuzz is not installed (apt-get install afl++)")
def test_fuzz_quick_via_cli(tmp_path):
    """`kvmpy bench fuzz --quick --json`: two short AFL++ campaigns (kvmpy, native) with their
    execs per second and the ratio, the compiler that built the native target, kvmpy's time
    split; a first crash where one was found (never a speed)."""
    out = tmp_path / "fuzz.json"
    r = run(["-m", "kvmpy", "bench", "fuzz", "--quick", "--seconds", "3", "--cases", "50", "--json",
             "--out", str(out)], cwd="/")
    assert r.returncode == 0, r.stderr.decode()
    data = json.loads(r.stdout)
    check_shape(data, "fuzz", {"kvmpy", "native"}, {"kvmpy/native execs_per_sec", "native/kvmpy execs_per_sec"})
    metrics = {(x["variant"], x["metric"]) for x in data["results"]}
    assert {("kvmpy", "execs_per_sec"), ("native", "execs_per_sec"), ("kvmpy", "per_case")} <= metrics
    p = data["params"]
    assert (p["seconds"], p["cases"], p["quick"], p["guest"]) == (3, 50, True, "fuzz-target")
    assert p["native_cc"] in ("afl-clang-fast", "afl-cc", "afl-gcc-fast", "afl-gcc")
    if p["native_cc"] != "afl-gcc":                  # afl-gcc has no persistent mode
        assert "persistent" in data["campaigns"]["native"]["target_mode"]
    for name in ("kvmpy", "native"):
        c = data["campaigns"][name]
        assert c["execs_done"] > 0 and c["corpus_count"] >= 1 and c["queue"] >= 1
        assert (c["first_crash_s"] is None) == (c["first_crash_signal"] is None) == (c["first_crash_execs"] is None)
    split = data["campaigns"]["kvmpy"]["split"]
    assert split["cases"] == 50 and split["case_us"] > 0 and split["reset_us"] > 0
    assert set(split["reset_parts_us"]) == {"pages", "vcpu", "irqchip", "devices", "disks"}
    assert b"kvmpy/native" in r.stderr and json.loads(out.read_text()) == data
