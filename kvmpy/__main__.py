"""``python -m kvmpy`` is the ``kvmpy`` command."""
from .cli import entry

entry()
