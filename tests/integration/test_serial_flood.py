"""A guest flooding COM1 into a pipe nobody reads still stops on time (issue 11, finding 2).

Output goes through the console's bounded queue and writer thread, so the vCPU never
waits for the stream: the run's timeout, request_stop() and close() keep working, and
what the stream could not take is dropped and counted.
"""
import fcntl
import os
import threading
import time

import pytest

import kvmpy

# mov dx,0x3f8; mov al,'x'; out dx,al; jmp $-1 (back to the out): one exit per byte, forever
FLOOD = bytes.fromhex("baf803 b078 ee ebfd")
NATIVE = pytest.mark.parametrize("native", [True, False], ids=["native", "python"])


def stalled_pipe():
    """(read fd, write file) of a 4 KiB pipe whose read end nobody reads."""
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    return r, os.fdopen(w, "wb", buffering=0)


def run_in_thread(fn, limit: float):
    """fn() in a thread; (its result, seconds taken), or a failure if it is still running
    after ``limit`` seconds (a regression must fail the test, not hang the suite)."""
    box = {}

    def body():
        t = time.monotonic()
        box["result"] = fn()
        box["took"] = time.monotonic() - t
    th = threading.Thread(target=body, daemon=True)
    th.start()
    th.join(limit)
    assert not th.is_alive(), f"still running after {limit} s: blocked on the stalled output stream"
    return box["result"], box["took"]


@NATIVE
def test_a_flood_into_a_stalled_pipe_ends_at_its_timeout(kvm_required, native):
    r, out = stalled_pipe()
    try:
        m = kvmpy.Machine(mem_size=1 << 20, serial=out, native=native)
        m.load(FLOOD, format="raw", mode="real")
        result, took = run_in_thread(lambda: m.run(timeout=1.5), 15)
        assert result.reason == "timeout" and took < 4.0
        assert m.stats.devices["com1"] > 8192       # far more than the pipe holds
        _, took = run_in_thread(m.close, 10)
        assert took < 3.0
    finally:
        os.close(r)                      # the writer thread's blocked write fails now and it ends
        out.close()


@NATIVE
def test_request_stop_ends_a_flood_into_a_stalled_pipe(kvm_required, native):
    r, out = stalled_pipe()
    try:
        with kvmpy.Machine(mem_size=1 << 20, serial=out, native=native) as m:
            m.load(FLOOD, format="raw", mode="real")
            m.start()
            time.sleep(1.5)              # long enough to fill the pipe (and the C UART's 64 KiB)
            t = time.monotonic()
            m.request_stop()
            result, _ = run_in_thread(lambda: m.wait(10), 15)
            assert result.reason == "interrupted" and time.monotonic() - t < 3.0
    finally:
        os.close(r)
        out.close()
