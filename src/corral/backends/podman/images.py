"""Load Corral's OCI image layouts into Podman's storage, once per digest.

No registry is involved: `podman pull oci:<layout>:<ref>` copies the layout
offline. The image is then named `localhost/corral-image:<manifest digest>`,
which is how later creates find it without reading the layout again.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
from pathlib import Path

from corral.backends.base import ImageRef
from corral.backends.podman.engine import Podman
from corral.errors import SandboxStartError

IMAGE_REPOSITORY = "localhost/corral-image"
REF_NAME = "org.opencontainers.image.ref.name"


def image_name(image: ImageRef) -> str:
    return f"{IMAGE_REPOSITORY}:{image.digest.removeprefix('sha256:')}"


class ImageLoader:
    """Puts images into Podman's storage; remembers what this process already saw."""

    def __init__(self, podman: Podman) -> None:
        self.podman = podman
        self._present: set[str] = set()

    async def ensure(self, image: ImageRef, sandbox_id: str) -> str:
        """The podman name of `image`, loading it from its layout when missing."""
        name = image_name(image)
        if name in self._present:
            return name
        if (await self.podman.run("image", "exists", name)).returncode != 0:
            lock_path = self.podman.home / "images.lock"
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
                if (await self.podman.run("image", "exists", name)).returncode != 0:
                    await self._load(image, name, sandbox_id)
            finally:
                os.close(fd)
        self._present.add(name)
        return name

    async def _load(self, image: ImageRef, name: str, sandbox_id: str) -> None:
        if image.layout is None or not (image.layout / "index.json").is_file():
            raise SandboxStartError(
                f"image {image.digest[:19]} has no OCI layout to load into podman",
                sandbox_id=sandbox_id,
                backend="podman",
                hint="rebuild the image (`corral images build --force`)",
            )
        source = f"oci:{image.layout}"
        ref = _ref_name(image.layout, image.digest)
        if ref is not None:
            source += f":{ref}"
        policy = str(self.podman.home / "policy.json")
        pulled = await self.podman.run("pull", "--quiet", "--signature-policy", policy, source)
        if pulled.returncode != 0:
            raise SandboxStartError(
                f"podman could not load image {image.digest[:19]} from {image.layout}",
                sandbox_id=sandbox_id,
                backend="podman",
                stderr_tail=pulled.error,
                hint="check the layout is complete, or rebuild the image",
            )
        image_id = pulled.stdout.decode().split()[-1]
        await self.podman.run("tag", image_id, name)
        # `pull oci:` names the image after the layout's path; only our name stays.
        inspected = await self.podman.run("image", "inspect", "--format", "json", image_id)
        if inspected.returncode == 0:
            for entry in json.loads(inspected.stdout or b"[]"):
                for tag in entry.get("RepoTags") or []:
                    if not tag.startswith(IMAGE_REPOSITORY + ":"):
                        await self.podman.run("untag", image_id, tag)


def _ref_name(layout: Path, digest: str) -> str | None:
    """The ref name the layout's index gives the manifest `digest` (None: use the only one)."""
    try:
        index = json.loads((layout / "index.json").read_text())
    except (OSError, ValueError):
        return None
    for manifest in index.get("manifests", []):
        if manifest.get("digest") == digest:
            name = (manifest.get("annotations") or {}).get(REF_NAME)
            return str(name) if name else None
    return None
