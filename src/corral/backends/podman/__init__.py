"""The `podman` backend: crun, runc or runsc through Podman, with Corral's own config."""

from corral.backends.podman.backend import PodmanBackend

__all__ = ["PodmanBackend"]
