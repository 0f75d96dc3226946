"""The console's output path: never blocks the guest, bounded, drops and counts, reports failure."""
import threading
import time

from kvmpy.vmm.console import BATCH, LIMIT, Console


class StalledStream:
    """A stream whose write() blocks until released (a pipe nobody reads)."""

    def __init__(self):
        self.release, self.data = threading.Event(), bytearray()

    def write(self, data):
        self.release.wait()
        self.data += data
        return len(data)

    def flush(self):
        pass


def test_output_to_a_stalled_stream_never_blocks_and_is_bounded():
    out = StalledStream()
    c = Console(out)
    chunk = b"x" * 65536
    t = time.monotonic()
    for _ in range(48):                           # 3 MiB of guest output
        assert c.write(chunk) == len(chunk)
    assert time.monotonic() - t < 1.0             # no write waited for the stream
    assert not c.flush(timeout=0.1)               # the stream has not taken it
    assert LIMIT <= 48 * len(chunk) - c.dropped <= LIMIT + BATCH   # at most the queue and the batch in hand (no throttling here)
    out.release.set()
    assert c.flush(timeout=5)
    assert len(out.data) == 48 * len(chunk) - c.dropped
    c.close()


def test_a_failing_stream_is_reported_once_and_later_output_dropped():
    class Broken:
        def write(self, data):
            raise BrokenPipeError(32, "Broken pipe")
    errors = []
    c = Console(Broken())
    c.on_error = errors.append
    c.write(b"hello")
    c.flush(timeout=5)
    deadline = time.monotonic() + 5
    while not errors and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(errors) == 1 and isinstance(errors[0], BrokenPipeError)
    c.write(b"more")
    assert c.dropped == len(b"more") and isinstance(c.take_error(), BrokenPipeError)
    c.close()


def test_in_memory_output_is_there_at_once():
    c = Console(None)
    c.write(b"abc")
    assert c.output == b"abc" and c.flush(timeout=0)
