"""The `oci` backend: crun, runc or runsc driven directly."""

from corral.backends.oci.backend import OciBackend

__all__ = ["OciBackend"]
