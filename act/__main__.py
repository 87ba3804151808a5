"""`python -m act`: see `act.text.cli`."""

from .text.cli import main

raise SystemExit(main())
