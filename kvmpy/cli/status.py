"""What the ``kvmpy`` command tells whoever started it: its exit statuses, the help text
that documents them (``kvmpy run --help``, ``kvmpy demo --help``), and progress lines on
stderr.

The guest's own isa-debug-exit statuses are always odd, so every status of kvmpy's own
is even (but ``EXIT_DEMO_FAILED``: a demo that ran and broke its promise).
"""
from __future__ import annotations

import sys

EXIT_OK = 0
EXIT_DEMO_FAILED = 1        # kvmpy demo: the guest ended, but not as its description promises
EXIT_USAGE = 2
EXIT_VMM_ERROR = 4          # bad image, KVM unavailable, bad option value
EXIT_RESET = 120
EXIT_TRIPLE_FAULT = 122
EXIT_TIMEOUT = 124
EXIT_INTERNAL_ERROR = 126   # KVM internal error, entry failure, unsupported exit
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = f"""exit status:
  odd N      the guest wrote v to isa-debug-exit (port 0xf4): N = ((v << 1) | 1) & 0xff
  {EXIT_OK:<10} the guest halted (HLT; only with --no-irqchip: by default HLT waits for interrupts)
  {EXIT_USAGE:<10} bad command line
  {EXIT_VMM_ERROR:<10} kvmpy could not start the guest (bad image, KVM unavailable)
  {EXIT_RESET:<10} the guest reset the machine (i8042 0xFE, port 0x92 bit 0, 0xcf9)
  {EXIT_TRIPLE_FAULT:<10} the guest triple-faulted (register dump and code on stderr)
  {EXIT_TIMEOUT:<10} --timeout expired
  {EXIT_INTERNAL_ERROR:<10} KVM internal error, entry failure or unsupported exit
  {EXIT_INTERRUPTED:<10} interrupted: Ctrl-C (SIGINT), or Ctrl-A x when stdin is a terminal
  {EXIT_OK:<10} (also) the guest was migrated away or stopped through --control"""

DEMO_CODES_HELP = f"""exit status of kvmpy demo:
  {EXIT_OK:<10} the guest did what its description promises (its exit value and output line)
  {EXIT_DEMO_FAILED:<10} it exited otherwise, or stopped without exiting (HLT, --control stop)
  other      it never got to its exit: {EXIT_VMM_ERROR}, {EXIT_RESET}, {EXIT_TRIPLE_FAULT}, {EXIT_TIMEOUT}, {EXIT_INTERNAL_ERROR}, {EXIT_INTERRUPTED} as for kvmpy run
  the reason why not is the last line on stderr: 'kvmpy: demo NAME failed: ...'

""" + EXIT_CODES_HELP.replace("exit status:", "exit status of kvmpy run:", 1)


def progress(text: str) -> None:
    """A progress line on stderr (a migration's rounds, a snapshot being written)."""
    print(f"kvmpy: {text}", file=sys.stderr, flush=True)
