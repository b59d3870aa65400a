"""`meshctl observe`: Hubble-style flows from every ztunnel and waypoint.

`sources` finds the proxies (a lab's nodes and waypoints, or a cluster's ztunnel and waypoint
pods through the API server) and reads their `/flows` streams; `filters` turns the flags into
the server-side query (the same `mesh.flows.FlowFilter` the proxies apply); `output` prints
flows as compact lines, JSON or a table; `cli` wires the subcommands, including `map` and `ui`
(built elsewhere, in `map.py` and `ui.py`).
"""
