"""The commands that run no guest here: ``info`` (is KVM usable?), ``demos`` (the bundled
guests), ``ctl`` and ``inspect`` (one request to a running kvmpy's ``--control`` socket,
kvmpy.lifecycle.control) and ``bench`` (kvmpy.bench, which parses its own options).
"""
from __future__ import annotations

import os
import sys

from .status import EXIT_OK, EXIT_USAGE, EXIT_VMM_ERROR, progress


def cmd_info(args) -> int:
    from ..kvm.abi import Cap
    from ..kvm import Kvm
    from ..kvm.system import backend_modules
    with Kvm() as kvm:
        print("KVM: usable (/dev/kvm)")
        print(f"API version: {kvm.api_version()}")
        print(f"backend module: {', '.join(backend_modules()) or 'unknown'}")
        print(f"vCPU mmap size: {kvm.vcpu_mmap_size()} bytes")
        print(f"supported CPUID leaves: {len(kvm.supported_cpuid())}; MSRs to save: {len(kvm.msr_index_list())}")
        print("capabilities:")
        for cap in Cap:
            print(f"  {cap.name:<28} {kvm.check_extension(cap)}")
    return EXIT_OK


def cmd_demos(args) -> int:
    from ..images import guests
    width = max(len(g.name) for g in guests.all() if g.demo)
    for g in guests.all():
        if g.demo:
            print(f"  {g.name:<{width}}  {g.description}")
    print("\nrun one with: kvmpy demo NAME   (options: kvmpy demo --help)")
    print("and a real Linux: 'kvmpy demo linux' boots Debian's cloud kernel with its root on a virtio disk\n"
          "to a shell on your terminal (needs VMX or SVM; 'reboot' in the guest leaves)")
    return EXIT_OK


def cmd_ctl(args) -> int:
    extra = {}
    if args.cmd in ("snapshot", "migrate"):
        if not args.arg:
            print(f"kvmpy: ctl {args.cmd} needs {'DIR' if args.cmd == 'snapshot' else 'HOST:PORT'}",
                  file=sys.stderr)
            return EXIT_USAGE
        extra = {"path": os.path.abspath(args.arg)} if args.cmd == "snapshot" else {"to": args.arg}
    elif args.cmd == "inspect" and args.arg is not None:
        try:
            extra = {"vcpu": int(args.arg)}
        except ValueError:
            print(f"kvmpy: inspect takes a vCPU number, got {args.arg!r}", file=sys.stderr)
            return EXIT_USAGE
    elif args.arg is not None:
        print(f"kvmpy: ctl {args.cmd} takes no argument", file=sys.stderr)
        return EXIT_USAGE
    if args.key_file is not None and args.cmd != "migrate":
        print("kvmpy: --key-file is for ctl migrate", file=sys.stderr)
        return EXIT_USAGE
    if args.cmd == "migrate" and _migration_key(args.key_file, extra) is None:
        return EXIT_USAGE
    answer = _ask(args.socket, args.cmd, **extra)
    if answer is None:
        return EXIT_VMM_ERROR
    if "text" in answer:
        print(answer["text"])
    elif args.cmd in ("status", "pause", "resume"):
        print("paused" if answer.get("paused") else "running" if answer.get("running", True) else "stopped")
    elif args.cmd == "snapshot":
        print(f"saved {answer['path']}")
    return EXIT_OK


def _migration_key(path: str | None, extra: dict) -> dict | None:
    """Put the migration key (--key-file PATH, else $KVMPY_MIGRATION_KEY) into the request
    ``extra`` as hex: it goes over the control socket, never on a command line."""
    from ..errors import KvmpyError
    from ..lifecycle.channel import key_from
    try:
        key = key_from(path)
    except KvmpyError as e:
        print(f"kvmpy: {e}", file=sys.stderr)
        return None
    if key is not None:
        extra["key"] = key.hex()
    return extra


def cmd_inspect(args) -> int:
    answer = _ask(args.socket, "inspect", vcpu=args.vcpu, pause=True)
    if answer is None:
        return EXIT_VMM_ERROR
    print(answer["text"])
    return EXIT_OK


def _ask(socket_path: str, cmd: str, **extra) -> dict | None:
    """One control request; its answer if it succeeded, else None after saying why."""
    from ..lifecycle.control import ControlError, request
    try:
        answer = request(socket_path, cmd, progress=progress, **extra)
    except ControlError as e:
        print(f"kvmpy: {e}", file=sys.stderr)
        return None
    if not answer.get("ok"):
        print(f"kvmpy: {cmd}: {answer.get('error')}", file=sys.stderr)
        return None
    return answer


def cmd_bench(args) -> int:
    try:
        from .. import bench
    except ImportError as e:
        print(f"kvmpy: benchmarks are not available in this installation ({e})", file=sys.stderr)
        return EXIT_VMM_ERROR
    if args.name in (None, "-h", "--help") or args.name not in bench.BENCHMARKS:
        print("usage: kvmpy bench NAME [options]   (kvmpy bench NAME --help)\n\nbenchmarks:")
        for name, mod in bench.BENCHMARKS.items():
            print(f"  {name:<8} {mod.DESCRIPTION}")
        return EXIT_OK if args.name in (None, "-h", "--help") else EXIT_USAGE
    return bench.BENCHMARKS[args.name].main(args.bench_args)
