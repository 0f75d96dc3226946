"""``python -m kvmpy`` is the ``kvmpy`` command."""
import sys

from .cli import main

sys.exit(main())
