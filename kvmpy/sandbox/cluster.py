"""Sandboxes across machines: ``RaySandboxPool``, a pool whose sandboxes live in Ray actors.

Ray (the optional extra ``kvmpy[ray]``) already schedules work over a cluster; kvmpy adds
no scheduler of its own. Each actor owns one ``Sandbox`` (its machine, checkpoint and
resets stay in the actor's process) and serves one call at a time. Actors ask for one
unit of the custom resource ``kvm``, which only nodes that can run VMs advertise::

    ray start --head --resources "$(python -m kvmpy.sandbox.cluster)"       # {"kvm": N}
    ray start --address HEAD:6379 --resources "$(python -m kvmpy.sandbox.cluster)"

so a node without ``/dev/kvm`` never gets one. By default actors are spread over the
nodes (Ray's "SPREAD" strategy). ``call()`` is safe from any number of threads: it takes
an idle actor, waits for its result and gives it back; ``map()`` keeps every actor busy.

What stays the same as ``SandboxPool``: a crash, a timeout or a guest function's error is
the caller's exception, the very one the actor's sandbox raised (the pool unwraps Ray's
``RayTaskError``), and the sandbox goes on. What is new is that an
actor can die (its node lost, killed): that call fails with ``SandboxError`` naming the
actor, and the pool starts a replacement. Host functions run where the sandbox is, in the
actor's process: they are pickled (cloudpickle) and sent there by ``register()``.
"""
from __future__ import annotations

import json
import os
import queue
import sys
import threading

from .abi import SandboxError
from .pool import take_idle

RESOURCE = "kvm"                    # the custom resource a node with usable /dev/kvm advertises


def kvm_resources(per_node: int | None = None, device: str = "/dev/kvm") -> dict[str, float]:
    """What this node should advertise to Ray: ``{"kvm": N}`` if ``device`` is usable (N sandboxes:
    ``per_node``, default the CPU count), else ``{}``."""
    if not os.access(device, os.R_OK | os.W_OK):
        return {}
    return {RESOURCE: float(per_node or os.cpu_count() or 1)}


def _ray():
    try:
        import ray
    except ImportError:
        raise SandboxError("RaySandboxPool needs Ray: pip install 'kvmpy[ray]'") from None
    return ray


class SandboxActor:
    """The body of one actor: a ``Sandbox`` in a Ray worker process (made remote by the pool)."""

    def __init__(self, image, options: dict):
        from .sandbox import Sandbox               # in the worker: kvmpy is imported there
        self.sandbox = Sandbox(image, **options)

    def call(self, name: str, args: tuple, timeout: float | None):
        return self.sandbox.call(name, *args, timeout=timeout)

    def register(self, name: str, fn, signature: str) -> None:
        self.sandbox.register(name, fn, signature)

    def where(self) -> dict:
        import ray
        return {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "host": os.uname().nodename, "calls": self.sandbox.calls}

    def close(self) -> None:
        self.sandbox.close()


class RaySandboxPool:
    """``size`` Ray actors, each owning ``Sandbox(image, **options)``; see the module docstring.

    ``resources`` is what each actor asks for (default one ``kvm``), ``strategy`` Ray's
    scheduling strategy (default "SPREAD"), ``ready_timeout`` how long the actors may take to
    start (an actor no node can host waits forever in Ray: the pool fails instead, saying
    so). Ray must be initialised (``ray.init(address=...)``); if it is not, the pool starts
    a local one.
    """

    def __init__(self, image="sandbox-demo", size: int = 2, *, resources: dict | None = None,
                 strategy: str = "SPREAD", ready_timeout: float = 120.0, **options):
        if size < 1:
            raise ValueError(f"a pool needs at least one sandbox, not {size}")
        ray = _ray()
        if not ray.is_initialized():
            ray.init()
        self.image, self.options, self.size = image, options, size
        self.resources = {RESOURCE: 1} if resources is None else dict(resources)
        self._remote = ray.remote(SandboxActor).options(num_cpus=0, resources=self.resources,
                                                         scheduling_strategy=strategy, max_concurrency=1)
        self._host_functions: dict = {}
        self._idle: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self.replaced = 0
        self.actors = [self._remote.remote(image, options) for _ in range(size)]
        try:
            self._wait_ready(self.actors, ready_timeout)
        except BaseException:
            self.close()
            raise
        for a in self.actors:
            self._idle.put(a)

    def _wait_ready(self, actors: list, timeout: float) -> None:
        ray = _ray()
        refs = [a.where.remote() for a in actors]
        done, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        if pending:
            raise SandboxError(f"only {len(done)} of {len(refs)} sandbox actors started within {timeout:g} s: "
                               f"does the cluster advertise enough {self.resources} "
                               f"(ray start --resources '{json.dumps({RESOURCE: 4})}')?")
        ray.get(done)                       # an actor whose Sandbox failed raises its error here

    def call(self, name: str, *args, timeout: float | None = None, wait: float | None = None):
        """``Sandbox.call`` on an idle actor's sandbox; ``wait`` bounds the wait for one (seconds)."""
        actor = take_idle(self._idle, wait, self.size, self._closed)
        ray = _ray()
        try:
            return ray.get(actor.call.remote(name, args, timeout))
        except ray.exceptions.RayTaskError as e:   # the call's own exception, as the actor raised it
            raise (e.cause if isinstance(e.cause, Exception) else e) from None
        except ray.exceptions.RayActorError as e:
            self._replace(actor)
            actor = None
            raise SandboxError(f"{name}: the sandbox's actor died ({type(e).__name__}); "
                               "the pool started another") from None
        finally:
            if actor is not None:
                self._give_back(actor)

    def map(self, name: str, arg_lists, timeout: float | None = None) -> list:
        """``call(name, *args)`` for each ``args`` of ``arg_lists``, spread over every actor at
        once; the results in order. The first exception is raised after every call has ended."""
        return _threaded(self, name, list(arg_lists), timeout)

    def register(self, name: str, fn, signature: str) -> None:
        """Register a host function in every actor's sandbox (and in replacements): it is
        pickled and runs in the actor's process."""
        ray = _ray()
        with self._lock:
            self._host_functions[name] = (fn, signature)
            actors = list(self.actors)
        ray.get([a.register.remote(name, fn, signature) for a in actors])

    def where(self) -> list[dict]:
        """Each actor's node id, host name, process id and calls served."""
        return _ray().get([a.where.remote() for a in list(self.actors)])

    def _give_back(self, actor) -> None:
        if not self._closed:
            self._idle.put(actor)

    def _replace(self, dead) -> None:
        ray = _ray()
        options = dict(self.options)
        with self._lock:
            if dead in self.actors:
                self.actors.remove(dead)
            options["host_functions"] = {**options.get("host_functions", {}), **self._host_functions}
            self.replaced += 1
        if self._closed:
            return
        actor = self._remote.remote(self.image, options)
        try:
            ray.get(actor.where.remote())
        except Exception:                   # noqa: BLE001 - the dead actor's error is the caller's
            ray.kill(actor)
            with self._lock:
                self.size -= 1
            return
        with self._lock:
            self.actors.append(actor)
        self._idle.put(actor)

    def close(self) -> None:
        """Close every sandbox and end the actors."""
        if self._closed:
            return
        self._closed = True
        ray = _ray()
        with self._lock:
            actors = list(self.actors)
        for a in actors:
            try:
                ray.get(a.close.remote(), timeout=30)
            except Exception:               # noqa: BLE001 - a dead actor has nothing to close
                pass
            ray.kill(a)
        self._idle.put(None)

    def __enter__(self) -> "RaySandboxPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _threaded(pool: RaySandboxPool, name: str, arg_lists: list, timeout: float | None) -> list:
    """``map``'s work: as many threads as the pool has actors, each taking the next arguments."""
    results: list = [None] * len(arg_lists)
    errors: list = []
    lock = threading.Lock()
    todo = iter(range(len(arg_lists)))

    def worker() -> None:
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            try:
                results[i] = pool.call(name, *arg_lists[i], timeout=timeout)
            except Exception as e:          # noqa: BLE001 - raised below, once every call ended
                with lock:
                    errors.append((i, e))
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(pool.size, len(arg_lists)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise min(errors, key=lambda x: x[0])[1]
    return results


def main(argv: list[str] | None = None) -> int:
    """``python -m kvmpy.sandbox.cluster [N]``: this node's resources for ``ray start --resources``."""
    argv = sys.argv[1:] if argv is None else argv
    per_node = int(argv[0]) if argv else None
    print(json.dumps(kvm_resources(per_node)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
