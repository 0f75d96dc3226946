"""kvmpy.fuzz: run fuzz cases in a guest, one Python call each (docs/fuzzing.md).

    from kvmpy.fuzz import Harness
    with Harness("fuzz-target") as h:
        outcome = h.run(b"FZ\\x01S\\x02ab")     # crashed? kind? exit, coverage, time

``Harness`` (harness.py) checkpoints the guest at its ready point and resets in place
after every case; ``traps`` names CPU exceptions through an IDT of reporting stubs.
"""
from .harness import Harness, HarnessError, Outcome

__all__ = ["Harness", "HarnessError", "Outcome"]
