"""Sandboxes across machines (issue 15, item 5): RaySandboxPool on a local two-node Ray cluster.

The cluster is two Ray nodes on this machine (``ray.cluster_utils.Cluster``), each advertising
two units of the ``kvm`` resource, as ``ray start --resources`` would on two hosts. Ray is an
optional extra (``pip install 'kvmpy[ray]'``); CI installs it, so there this runs.
"""
import os
from pathlib import Path

import pytest

import kvmpy
from kvmpy.sandbox import GuestFunctionError, SandboxCrash, SandboxError
from kvmpy.sandbox.cluster import RaySandboxPool, kvm_resources, main

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'kvmpy[ray]')")
cluster_utils = pytest.importorskip("ray.cluster_utils")


pytestmark = pytest.mark.kvm         # kvmpy's pytest plugin: skip, or fail under KVMPY_REQUIRE_KVM=1


@pytest.fixture(scope="module")
def cluster():
    # The workers import the same kvmpy as this process: its directory goes first on their path, and
    # the nodes and the job start in / (Ray puts the driver's directory on the workers' path too:
    # from a checkout whose extension is not built in place, as in CI, they would import that tree).
    here = os.getcwd()
    os.chdir("/")
    try:
        c = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"kvm": 2}})
        c.add_node(num_cpus=1, resources={"kvm": 2})
        ray.init(address=c.address, log_to_driver=False, include_dashboard=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(Path(kvmpy.__file__).resolve().parent.parent)}})
    finally:
        os.chdir(here)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def pool(cluster):
    with RaySandboxPool("sandbox-demo", size=4, ready_timeout=180) as p:
        yield p


def test_the_sandboxes_spread_over_both_nodes_and_answer(pool):
    where = pool.where()
    assert len(where) == 4 and len({w["node"] for w in where}) == 2
    assert all(w["pid"] != os.getpid() for w in where)
    assert pool.call("add", 2, 3) == 5
    assert pool.call("reverse", b"kvmpy") == b"ypmvk"
    assert pool.map("add", [(i, 10 * i) for i in range(40)]) == [11 * i for i in range(40)]
    assert sum(w["calls"] for w in pool.where()) >= 42


def test_a_crash_or_an_error_is_the_callers_exception_and_the_sandbox_goes_on(pool):
    with pytest.raises(SandboxCrash) as e:
        pool.call("crash", 1)
    assert e.value.kind.startswith("#") and "the guest crashed" in str(e.value)
    with pytest.raises(GuestFunctionError):
        pool.call("fail", "on purpose")
    assert pool.map("counter", [()] * 8) == [pool.call("counter")] * 8     # reset after each call


def test_a_host_function_runs_in_the_actor_that_owns_the_sandbox(pool):
    pool.register("decorate", lambda s: f"*{s}*", "s:s")
    assert pool.map("shout", [("hi",)] * 6) == ["*HI*"] * 6


def test_a_dead_actor_fails_one_call_and_is_replaced(pool):
    before = pool.replaced
    for a in list(pool.actors):
        ray.kill(a)                             # as if every node were lost at once
    failed = 0
    for _ in range(8):
        try:
            assert pool.call("add", 1, 1) == 2
        except SandboxError as e:
            assert "actor died" in str(e)
            failed += 1
    assert failed == 4 and pool.replaced == before + 4 and len(pool.actors) == 4
    assert pool.call("shout", "ok") == "*OK*"    # the replacements got the host function too


def test_a_pool_the_cluster_cannot_place_fails_clearly(cluster):
    with pytest.raises(SandboxError, match="actors started within"):
        RaySandboxPool("sandbox-demo", size=1, resources={"kvm": 64}, ready_timeout=3)


def test_a_node_advertises_kvm_only_where_it_can_run_vms(tmp_path, capsys):
    assert kvm_resources(3) == {"kvm": 3.0}
    assert kvm_resources(device=str(tmp_path / "no-kvm")) == {}
    assert main(["2"]) == 0 and capsys.readouterr().out.strip() == '{"kvm": 2.0}'
