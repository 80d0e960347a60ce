"""``python -m localkv``: the same as the ``localkv`` command."""

from .cli import main

raise SystemExit(main())
