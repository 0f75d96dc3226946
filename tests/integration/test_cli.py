"""The kvmpy command: demos, run, exit statuses, errors without tracebacks, Ctrl-C."""
import re
import signal
import subprocess
import sys
import time

import pytest

from kvmpy import guests
from kvmpy.kvm.system import backend_modules
from kvmpy.cli import EXIT_DEMO_FAILED, EXIT_INTERRUPTED, EXIT_TIMEOUT, EXIT_TRIPLE_FAULT, EXIT_VMM_ERROR

from . import lab

# Run the same kvmpy the tests imported (installed or built in place), from a neutral cwd.
ENV = lab.CHILD_ENV
CMD = [sys.executable, "-m", "kvmpy"]


def kvmpy(*args, input=None, timeout=60):
    return subprocess.run([*CMD, *args], input=input, capture_output=True, timeout=timeout,
                          env=ENV, cwd="/")


def test_info_reports_kvm():
    """kvmpy info says KVM is usable and lists the API version and capabilities."""
    r = kvmpy("info")
    assert r.returncode == 0
    assert b"API version: 12" in r.stdout and b"IMMEDIATE_EXIT" in r.stdout


def test_demos_lists_every_demo():
    """kvmpy demos lists each demo guest with its description."""
    r = kvmpy("demos")
    for g in guests.all():
        assert (g.name.encode() in r.stdout) == g.demo


@pytest.mark.parametrize("name", [g.name for g in guests.all() if g.demo])
def test_demo_that_keeps_its_promise_exits_0(name):
    """kvmpy demo NAME prints the guest's output and exits 0 when the guest kept its promise."""
    g = guests.get(name)
    r = kvmpy("demo", name, input=b"")
    assert r.returncode == 0, r.stderr
    assert b"failed" not in r.stderr
    if g.needs_disk:                        # the demo lends itself a scratch disk of zeros
        assert r.stdout.startswith(g.expect_output.splitlines(keepends=True)[0])
        assert b"scratch 1 MiB" in r.stderr
        return
    if g.needs_rng:                         # the demo adds the rng: the marker's line, not "no device"
        assert r.stdout.startswith(g.expect_output.splitlines(keepends=True)[0])
        assert re.search(g.marker, r.stdout, re.M)
        return
    assert r.stdout == g.expect_output


def last_line(stderr: bytes) -> str:
    lines = stderr.decode().splitlines()
    return lines[-1] if lines else ""


def test_demo_whose_guest_breaks_its_promise_fails_with_one_line(tmp_path):
    """blk-write on a read-only disk cannot write: the demo exits 1 and says why in one line."""
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    r = kvmpy("demo", "blk-write", "--disk", f"{disk},ro")
    assert b"write failed (read-only?)" in r.stdout
    assert r.returncode == EXIT_DEMO_FAILED
    why = last_line(r.stderr)
    assert why.startswith("kvmpy: demo blk-write failed: ") and "0x45" in why and "0x44" in why, why
    assert b"Traceback" not in r.stderr


def tampered_demo(name: str, **change):
    """kvmpy demo NAME in a subprocess whose registry entry for NAME has ``change`` applied."""
    code = ("import dataclasses, sys\n"
            "from kvmpy import cli, guests\n"
            f"real = guests.get({name!r})\n"
            f"guests.get = lambda n: dataclasses.replace(real, **{change!r})\n"
            f"sys.exit(cli.main(['demo', {name!r}]))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, env=ENV, cwd="/",
                          input=b"")


@pytest.mark.parametrize("change, reason", [
    ({"expect_status": (43 << 1) | 1}, "it exited with status 85 (the guest's value 0x2a), expected 87 (value 0x2b)"),
    ({"marker": b"^Hello from short mode$"}, "its output has no line matching /^Hello from short mode$/"),
], ids=["status", "marker"])
def test_demo_with_a_tampered_expectation_fails(change, reason):
    """The same guest against a wrong expectation (status or output line): exit 1, the reason last."""
    r = tampered_demo("hello-long", **change)
    assert r.stdout == guests.get("hello-long").expect_output
    assert r.returncode == EXIT_DEMO_FAILED
    assert last_line(r.stderr) == f"kvmpy: demo hello-long failed: {reason}"


def test_demo_that_never_exits_keeps_the_run_status_and_says_why():
    """A demo stopped by --timeout before its exit: status 124 as for run, the demo's reason last."""
    r = kvmpy("demo", "hello-user", "--timeout", "0.001")
    assert r.returncode == EXIT_TIMEOUT
    assert last_line(r.stderr) == "kvmpy: demo hello-user failed: the --timeout expired"


@pytest.mark.parametrize("name", ["hello-long", "blk-write"])
def test_run_returns_the_guests_own_status(name, tmp_path):
    """kvmpy run of a bundled guest still exits with the guest's isa-debug-exit status."""
    g = guests.get(name)
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    r = kvmpy("run", str(g.path), "--disk", f"{disk},ro")      # blk-write: refused, 0x45
    assert r.returncode == (g.expect_status if name == "hello-long" else (0x45 << 1) | 1)
    assert b"failed" not in r.stderr


@pytest.mark.parametrize("loop", [[], ["--python"]], ids=["native", "python"])
def test_echo_demo_reads_piped_stdin(loop):
    """Piped stdin feeds the guest's UART, on the C and the Python run loop."""
    r = kvmpy("demo", "echo", *loop, input=b"piped\nquit\n")
    assert b"piped\n" in r.stdout and r.stdout.endswith(b"bye\n")


def test_run_raw_image_with_options(tmp_path):
    """kvmpy run takes a raw image with --format/--mode/--load-addr and returns the guest's status."""
    img = tmp_path / "boot.bin"
    img.write_bytes(bytes.fromhex("b0 09 e6 f4"))
    r = kvmpy("run", str(img), "--format", "raw", "--mode", "real", "--load-addr", "0x8000",
              "--mem", "1M", "--stats")
    assert r.returncode == (9 << 1) | 1
    assert b"isa-debug-exit" in r.stderr            # --stats table


def test_timeout_exit_status():
    """--timeout stops a guest that never stops, with exit status 124."""
    g = guests.get("spin")
    r = kvmpy("run", str(g.path), "--format", "raw", "--timeout", "0.3")
    assert r.returncode == EXIT_TIMEOUT == 124
    assert b"timeout" in r.stderr


def test_triple_fault_exit_status_and_report():
    """A triple fault exits 122 with a register dump and the code at RIP, not a traceback."""
    r = kvmpy("demo", "triple-fault")
    assert r.returncode == EXIT_TRIPLE_FAULT
    if "kvm_amd" in backend_modules():      # KVM reset the vCPU before reporting: nothing to show
        assert b"registers at the fault are lost" in r.stderr
    else:
        assert b"ud2" in r.stderr and b"rip=" in r.stderr
    assert b"Traceback" not in r.stderr


@pytest.mark.parametrize("content", [b"", b"\x7fELF\x02\x01\x01" + b"\0" * 60, b"\x7fELF" + b"\xff" * 100])
def test_bad_images_give_a_clear_error(tmp_path, content):
    """Missing, empty or malformed images exit 4 with a one-line reason and no traceback."""
    img = tmp_path / "bad.img"
    img.write_bytes(content)
    for path in (str(img), str(tmp_path / "missing")):
        r = kvmpy("run", path)
        assert r.returncode == EXIT_VMM_ERROR
        assert r.stderr.startswith(b"kvmpy: ") and b"Traceback" not in r.stderr


def test_unknown_demo_lists_the_demos():
    """An unknown demo name is a usage error that lists the real ones."""
    r = kvmpy("demo", "nope")
    assert r.returncode == 2 and b"hello-long" in r.stderr


def test_help_documents_exit_statuses():
    """kvmpy run --help explains the exit statuses."""
    r = kvmpy("run", "--help")
    assert b"124" in r.stdout and b"isa-debug-exit" in r.stdout


def test_ctrl_c_stops_a_run_cleanly():
    """SIGINT stops a running guest with exit status 130 and no traceback."""
    g = guests.get("spin")
    p = subprocess.Popen([*CMD, "run", str(g.path), "--format", "raw"], env=ENV, cwd="/",
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(1.5)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == EXIT_INTERRUPTED, err
    assert b"Traceback" not in err


def test_console_script_is_installed_or_module_runs():
    """python -m kvmpy with no command prints help and exits 2."""
    r = kvmpy()
    assert r.returncode == 2 and b"usage: kvmpy" in r.stdout


def test_trace_shows_each_exit_with_its_instruction():
    """--trace exits prints one line per exit on stderr with the port, data and the guest instruction."""
    r = kvmpy("demo", "hello-real", "--trace", "exits", "--trace-kinds", "io-out", "--trace-ports", "0x3f8")
    lines = r.stderr.decode().splitlines()
    g = guests.get("hello-real")
    assert r.stdout == g.expect_output
    assert len(lines) == len(g.expect_output)                 # one OUT per character
    first = lines[0].split()
    assert first[1:5] == ["cpu0", "io-out", "port=0x3f8", "size=1"]
    assert "data=48" in lines[0] and "out dx, al" in lines[0]     # 'H'


def test_trace_json_lines(tmp_path):
    """--trace-json writes every exit as a JSON object, IN exits with the value the guest received."""
    import json
    path = tmp_path / "trace.jsonl"
    r = kvmpy("demo", "stringio", "--trace-json", str(path))
    assert r.returncode == 0
    events = [json.loads(line) for line in path.read_text().splitlines()]
    ins = [e for e in events if e["kind"] == "io-in" and e["addr"] != 0x3FD]
    assert ins and all(set(bytes.fromhex(e["data"])) == {0xFF} for e in ins)   # unclaimed port reads
    assert {e["kind"] for e in events} >= {"io-out", "io-in"}


def test_stats_svg_file(tmp_path):
    """--stats-svg writes the run's statistics as an SVG chart naming the devices used."""
    import xml.etree.ElementTree as ET
    out = tmp_path / "stats.svg"
    r = kvmpy("demo", "hello-long", "--stats-svg", str(out))
    assert r.returncode == 0
    texts = {e.text for e in ET.parse(out).getroot().iter("{http://www.w3.org/2000/svg}text")}
    assert "com1" in texts and "isa-debug-exit" in texts


def test_inspect_prints_the_report_when_a_run_stops():
    """--inspect ends a run with the stopping vCPU's mode, page walks and code on stderr."""
    r = kvmpy("demo", "hello-long", "--inspect", input=b"")
    assert r.returncode == 0
    for needle in (b"long mode (64-bit), CPL 0, paging on (4-level)", b"== page walks ==",
                   b"PML4[0]", b"=> physical 0x", b"== code at "):
        assert needle in r.stderr, needle


def test_inspect_after_a_triple_fault():
    """A triple fault with --inspect: the one-line error, then the report, whose code is the ud2."""
    r = kvmpy("demo", "triple-fault", "--inspect", input=b"")
    assert r.returncode == EXIT_TRIPLE_FAULT
    assert b"triple-faulted" in r.stderr and b"no complete entry" in r.stderr and b"ud2" in r.stderr


def test_trace_steps_shows_instructions_and_register_changes():
    """--trace steps single-steps the guest: each instruction in order with the registers it changed."""
    r = kvmpy("demo", "hello-real", "--trace", "steps", "--trace-kinds", "step")
    g = guests.get("hello-real")
    assert r.stdout == g.expect_output and r.returncode == 0
    steps = [line for line in r.stderr.decode().splitlines() if " step " in line]
    assert steps[0].split()[3:] == ["0x7c00:", "cli"]
    lods = next(s for s in steps if "lodsb" in s)
    assert "rax=0x0->0x48" in lods                        # 'H', the first character of the message
    assert len(steps) > 10 * len(g.expect_output)         # every instruction, not just the exits


def test_record_and_replay_reproduce_a_run_without_its_input(tmp_path):
    """A run recorded with --trace-json replays with --replay: same output, same status, no stdin needed."""
    rec = tmp_path / "run.jsonl"
    first = kvmpy("demo", "echo", "--trace-json", str(rec), input=b"recorded line\nquit\n")
    again = kvmpy("demo", "echo", "--replay", str(rec), input=b"")
    assert b"recorded line\n" in first.stdout
    assert again.stdout == first.stdout and again.returncode == first.returncode


def test_replay_of_another_guest_diverges_clearly(tmp_path):
    """Replaying a recording against a different guest stops with a message naming the first difference."""
    rec = tmp_path / "run.jsonl"
    kvmpy("demo", "echo", "--trace-json", str(rec), input=b"x\nquit\n")
    r = kvmpy("demo", "hello-real", "--replay", str(rec))
    assert r.returncode == 4 and b"recording" in r.stderr and b"Traceback" not in r.stderr


#: Modules a command must not import unless it uses them: the disassembler (a C library),
#: the benchmarks, the gdb stub, live migration and the control socket.
NEVER_FOR_RUN = ("capstone", "kvmpy.bench", "kvmpy.debug.gdbstub", "kvmpy.lifecycle.migration",
                 "kvmpy.lifecycle.control")


def imported_by(*statements: str) -> set[str]:
    """sys.modules of a fresh interpreter after ``statements``, as its last line of output."""
    code = ("import sys\n" + "\n".join(statements) +
            "\nsys.stdout.write('\\n' + ' '.join(sorted(sys.modules)))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, env=ENV, cwd="/",
                       input=b"")
    assert r.returncode == 0, r.stderr
    return set(r.stdout.decode().splitlines()[-1].split())


def test_importing_the_cli_imports_no_machine():
    """import kvmpy.cli loads only the front end: no Machine, no KVM layer, nothing optional."""
    mods = imported_by("import kvmpy.cli")
    assert not mods & {"kvmpy.vmm", "kvmpy.kvm", "kvmpy._native", "kvmpy.devices", "kvmpy.loader",
                       "kvmpy.debug", "kvmpy.lifecycle", "kvmpy.images", "dataclasses", *NEVER_FOR_RUN}


def test_run_imports_only_what_it_uses():
    """kvmpy run of the bundled multiboot kernel imports no disassembler, benchmark, gdb stub or
    migration code, and the argument parser builds the run command only."""
    image = guests.get("multiboot-hello").path
    mods = imported_by("import kvmpy.cli", f"assert kvmpy.cli.main(['run', {str(image)!r}]) == 87")
    assert "kvmpy.vmm.machine" in mods
    assert not mods & set(NEVER_FOR_RUN)


#: What kvmpy run of a multiboot kernel loads only when used: the exit tracer (and json),
#: the x86 inspector, the disassembler, Linux's loaders, virtio-blk without a disk, html.
LOADED_WHEN_USED = ("kvmpy.debug.trace", "kvmpy.x86.disasm", "kvmpy.x86.inspect", "kvmpy.loader.linux",
                "kvmpy.devices.virtio.blk", "json", "html")


def test_run_imports_no_tracer_inspector_or_linux_loader():
    """kvmpy run of a multiboot kernel without --trace, --inspect, --gdb or a disk imports none of them."""
    image = guests.get("multiboot-hello").path
    mods = imported_by("import kvmpy.cli", f"assert kvmpy.cli.main(['run', {str(image)!r}]) == 87")
    assert not mods & set(LOADED_WHEN_USED), sorted(mods & set(LOADED_WHEN_USED))
