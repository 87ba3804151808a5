"""`python -m act`: see `act.cli`."""

from .cli import main

raise SystemExit(main())
