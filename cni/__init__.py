"""The CNI plugin (`ambientmesh-cni`) and its node installer: a separate binary, as istio-cni is."""
