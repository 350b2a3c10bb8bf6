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
from corral.backends.podman.service import PodmanService
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

    async def ensure(
        self, image: ImageRef, sandbox_id: str, service: PodmanService | None = None
    ) -> str:
        """The podman name of `image`, loading it from its layout when missing.
        With `service`, Podman's API says whether it is there (no podman process)."""
        name = image_name(image)
        if name in self._present:
            return name
        if not await self._exists(name, service):
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

    async def _exists(self, name: str, service: PodmanService | None) -> bool:
        if service is not None:
            answer = await service.request("GET", f"/images/{name}/exists")
            if answer.status_code in (204, 404):
                return answer.status_code == 204
        return (await self.podman.run("image", "exists", name)).returncode == 0

    async def _load(self, image: ImageRef, name: str, sandbox_id: str) -> None:
        if image.layout is None or not (image.layout / "index.json").is_file():
            raise SandboxStartError(
                f"image {image.digest[:19]} has no OCI layout to load into podman",
                sandbox_id=sandbox_id,
                backend="podman",
                hint="rebuild the image (`corral images build --force`)",
            )
        # `pull oci:<path>` names the image after the path, which must make a valid
        # reference (no capitals, e.g. a state dir under /home/Alice): pull through a
        # link relative to podman's cwd (its home) named by the digest instead.
        link = self.podman.home / "layouts" / image.digest.removeprefix("sha256:")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(image.layout.resolve())
        source = f"oci:{link.relative_to(self.podman.home)}"
        ref = _ref_name(image.layout, image.digest)
        if ref is not None:
            source += f":{ref}"
        policy = str(self.podman.home / "policy.json")
        try:
            pulled = await self.podman.run("pull", "--quiet", "--signature-policy", policy, source)
        finally:
            link.unlink(missing_ok=True)
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
