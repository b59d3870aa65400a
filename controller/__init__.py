"""Control plane: controllers that turn Kubernetes objects into running mesh components."""
