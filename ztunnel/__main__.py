"""`python -m ztunnel`: the same entry point as the console script."""

from ztunnel.main import main

raise SystemExit(main())
