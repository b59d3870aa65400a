"""In-pod mode: ztunnel's listeners inside each enrolled pod's netns, the enrolment protocol, the
redirect that captures the pod's traffic, and discovery of pods that predate the install
(as istio/ztunnel groups them under inpod/)."""
