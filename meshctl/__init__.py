"""meshctl: the operator's CLI (CA, lab, waypoints, doctor, bench)."""
