"""`python -m waypoint`: the same entry point as the console script."""

from waypoint.main import main

raise SystemExit(main())
