"""Images: templates realized as a rootfs directory plus an OCI image layout, cached.

`ImageStore` is the entry point; `rootfs`, `skeleton` and `oci_layout` are the
steps it runs.
"""

from corral.images.store import Image, ImageStore

__all__ = ["Image", "ImageStore"]
