"""Running pytest on a made-up project with kvmpy's plugin, as its users do (pytester in a
subprocess): the plugin comes through its pytest11 entry point where kvmpy is installed (CI:
``pip install .``), through ``-p kvmpy.testing.plugin`` where a checkout runs uninstalled."""
import os
from importlib.metadata import entry_points

import kvmpy

PLUGIN = "kvmpy.testing.plugin"
#: The child imports this kvmpy (a checkout's, or the installed one): its parent directory first.
PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(kvmpy.__file__)))
#: The inner conftest says how the plugin got registered (its name: "kvmpy" for the entry point).
HEADER = '''
def pytest_report_header(config):
    import kvmpy.testing.plugin as plugin
    return ["kvmpy plugin registered as: %s" % config.pluginmanager.get_name(plugin)]
'''


def entry_point_installed() -> bool:
    return (any(ep.value == PLUGIN for ep in entry_points(group="pytest11"))
            and not os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"))


def plugin_args() -> list[str]:
    """Nothing when pytest finds the plugin by itself; else the -p that loads it."""
    return [] if entry_point_installed() else ["-p", PLUGIN]


def run(pytester, monkeypatch, *args, env=None, timeout=180, session=True):
    """pytest in a child process in pytester's directory, with this kvmpy and ``env`` on top
    of ours (a None value removes the variable). A ``session`` prints the plugin's name in
    its header (HEADER, in the inner conftest): checked."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (PKG_PARENT, os.environ.get("PYTHONPATH")) if p))
    for k, v in (env or {}).items():
        if v is None:
            monkeypatch.delenv(k, raising=False)
        else:
            monkeypatch.setenv(k, v)
    result = pytester.runpytest_subprocess(*plugin_args(), "-p", "no:cacheprovider", *args, timeout=timeout)
    if session:
        want = "kvmpy" if entry_point_installed() else PLUGIN
        result.stdout.fnmatch_lines([f"kvmpy plugin registered as: {want}"])
    return result
