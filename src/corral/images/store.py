"""A content-addressed cache of realized templates: rootfs + OCI layout + metadata.

Layout under the store root (one directory per cache key, renamed into place
whole, so a reader sees a finished image or none):

    <root>/<key>/image.json   metadata (`Image`)
    <root>/<key>/rootfs/      what a sandbox runs on
    <root>/<key>/oci/         the same content as an OCI image layout
    <root>/.locks/<key>.lock  serializes builds of one key across processes
    <root>/.tmp-<key>-*       a build in progress (removed if it fails)
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import hashlib
import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from corral.backends.base import HostMount, ImageRef
from corral.errors import ImageBuildError, NotFoundError
from corral.images import oci_layout, rootfs, skeleton
from corral.spec.template import Template

__all__ = ["DEFAULT_PATH", "Image", "ImageStore"]

# Bump when the builders change what they write, so old cache entries miss.
_FORMAT = 1
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
_DIGEST_PREFIX = re.compile(r"^(sha256:)?([0-9a-f]{12,64})$")


@dataclass(frozen=True, slots=True)
class Image:
    """A realized template. `digest` (the OCI manifest's) identifies the content;
    `key` identifies the inputs it was built from."""

    digest: str
    key: str
    template: str  # the template that built it
    base: str
    rootfs: Path
    layout: Path
    size: int  # bytes of the layer tar
    created: str
    host_mounts: tuple[HostMount, ...]  # host paths a sandbox must bind (base host: /usr)
    env: dict[str, str]
    workdir: str
    uid: int
    gid: int
    home: str
    names: tuple[str, ...] = field(default=())  # every template name that resolved to it

    def to_ref(self) -> ImageRef:
        """What a backend needs (host_mounts travel separately, in SandboxConfig.mounts)."""
        return ImageRef(
            digest=self.digest,
            rootfs=self.rootfs,
            env=dict(self.env),
            workdir=self.workdir,
            uid=self.uid,
            gid=self.gid,
            home=self.home,
            layout=self.layout,
        )


class ImageStore:
    """Builds templates into images under `root` and caches them by their inputs.

    The cache key is the template's `image_key()` plus the host facts its base
    depends on (see `corral.images.rootfs`), so e.g. installing a library on
    the host (a new ld.so.cache) makes the next `build` of a host-based
    template rebuild. Templates that differ only in name share one image.
    """

    def __init__(self, root: Path, *, environ: Mapping[str, str] | None = None) -> None:
        """`environ` (default: os.environ) supplies SOURCE_DATE_EPOCH, the
        timestamp on every file in the layer."""
        self.root = root
        self.epoch = oci_layout.source_date_epoch(environ)

    def key(self, template: Template, builder: str = "default") -> str:
        """The cache key of `template` on this host, now."""
        inputs = {
            "format": _FORMAT,
            "image": template.image_key(),
            "base": template.base,
            "base_inputs": _builder(template, builder).inputs(),
            "epoch": self.epoch,
        }
        return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()

    def get(self, template: Template) -> Image | None:
        """The cached image for `template`, or None when it needs a build."""
        return self._load(self.key(template))

    def build(
        self,
        template: Template,
        *,
        force: bool = False,
        progress: bool = False,
        builder: str = "default",
    ) -> Image:
        """The image for `template`: cached, or built now (always when `force`).

        On failure (ImageBuildError) nothing is left under the root but the
        lock file; a cached image of the same key stays as it was.
        """
        key = self.key(template, builder)
        if not force and (cached := self._load(key)) is not None:
            return self._add_name(cached, template.name)
        with self._lock(key):
            if not force and (cached := self._load(key)) is not None:  # built meanwhile
                return self._add_name(cached, template.name)
            for stale in self.root.glob(f".*-{key}-*"):  # left by a killed builder
                rootfs.remove_tree(stale)
            with _progress(progress, f"building image '{template.name}'") as log:
                return self._build_locked(template, key, log, _builder(template, builder))

    def list(self) -> builtins.list[Image]:
        """Every image in the store, oldest first."""
        if not self.root.is_dir():
            return []
        found = (self._load(entry.name) for entry in self.root.iterdir())
        images = [image for image in found if image is not None]
        return sorted(images, key=lambda image: (image.created, image.template))

    def remove(self, ref: str) -> None:
        """Delete every image matching `ref`: a template name, a digest, or a
        digest prefix of at least 12 hex digits. NotFoundError when none does."""
        matches = [image for image in self.list() if _matches(image, ref)]
        if not matches:
            raise NotFoundError(
                f"no image matches '{ref}'",
                hint="give a template name, a digest, or at least 12 hex digits of one "
                "(list them with `corral images list`)",
            )
        for image in matches:
            with self._lock(image.key):
                directory = self.root / image.key
                if directory.exists():
                    rootfs.remove_tree(_retire(directory))

    def ref(self, image: Image) -> ImageRef:
        return image.to_ref()  # here too, for callers that hold the store, not the image

    def _build_locked(
        self, template: Template, key: str, log: rootfs.Log, builder: rootfs.BaseBuilder
    ) -> Image:
        started = time.monotonic()
        temp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=self.root))
        temp.chmod(0o755)  # mkdtemp's 0700 would hide the rootfs from a user-namespaced runtime
        final, old = self.root / key, None
        try:
            builder.populate(temp / "rootfs", log, self.epoch)
            log("adding accounts, mount points and files")
            skeleton.write_skeleton(temp / "rootfs", template)
            log("writing the OCI image layout")
            env = _image_env(template)
            user = template.user
            layout = oci_layout.write_layout(
                temp / "rootfs",
                temp / "oci",
                name=template.name,
                env=env,
                workdir=template.workdir,
                uid=user.uid,
                gid=user.gid,
                epoch=self.epoch,
            )
            image = Image(
                digest=layout.digest,
                key=key,
                template=template.name,
                base=template.base,
                rootfs=final / "rootfs",
                layout=final / "oci",
                size=layout.layer_size,
                created=datetime.now(UTC).isoformat(timespec="seconds"),
                host_mounts=(HostMount(Path("/usr"), "/usr"),) if template.base == "host" else (),
                env=env,
                workdir=template.workdir,
                uid=user.uid,
                gid=user.gid,
                home=skeleton.home_of(user),
                names=(template.name,),
            )
            _write_metadata(temp, image)
            old = _retire(final) if final.exists() else None
            temp.rename(final)
        except BaseException as exc:
            if old is not None and not final.exists():
                old.rename(final)  # put the previous image back
            rootfs.remove_tree(temp)
            if isinstance(exc, Exception) and not isinstance(exc, ImageBuildError):
                raise _build_error(template, exc, self.root) from exc
            raise
        if old is not None:
            rootfs.remove_tree(old)
        log(f"built {image.digest[:19]} ({image.size} bytes) in {time.monotonic() - started:.1f}s")
        return image

    def _load(self, key: str) -> Image | None:
        directory = self.root / key
        try:
            data = json.loads((directory / "image.json").read_text())
            mounts = tuple(HostMount(Path(m["source"]), m["target"]) for m in data["host_mounts"])
            image = Image(
                **{**data, "host_mounts": mounts, "names": tuple(data["names"])},
                rootfs=directory / "rootfs",
                layout=directory / "oci",
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None  # no image, or a damaged one: treated as missing and rebuilt
        return image if image.key == key and image.rootfs.is_dir() else None

    def _add_name(self, image: Image, name: str) -> Image:
        """Record that template `name` also resolves to `image` (metadata only)."""
        if name in image.names:
            return image
        with self._lock(image.key):
            current = self._load(image.key) or image
            updated = replace(current, names=(*current.names, name))
            oci_layout.add_ref_name(updated.layout, name)
            _write_metadata(self.root / image.key, updated)
        return updated

    @contextlib.contextmanager
    def _lock(self, key: str) -> Iterator[None]:
        (self.root / ".locks").mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".locks" / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock


BUILDERS = ("default", "nix")


def _builder(template: Template, name: str) -> rootfs.BaseBuilder:
    """`default`: the template's base (host, busybox, Debian); `nix`: the flake's output."""
    if name == "default":
        return rootfs.builder_for(template)
    if name == "nix":
        from corral.images.nix import NixBuilder

        return NixBuilder(template)
    raise ImageBuildError(f"unknown image builder '{name}'", hint="use one of: default, nix")


def _image_env(template: Template) -> dict[str, str]:
    """The template's env with PATH and HOME filled in, sorted (it is hashed)."""
    env = {"PATH": DEFAULT_PATH, "HOME": skeleton.home_of(template.user), **template.env}
    return dict(sorted(env.items()))


def _matches(image: Image, ref: str) -> bool:
    if ref == image.template or ref in image.names or ref == image.digest:
        return True
    prefix = _DIGEST_PREFIX.match(ref)
    return prefix is not None and image.digest.removeprefix("sha256:").startswith(prefix[2])


def _write_metadata(directory: Path, image: Image) -> None:
    data: dict[str, Any] = asdict(image)
    del data["rootfs"], data["layout"]  # derived from where the directory is
    data["host_mounts"] = [{"source": str(m.source), "target": m.target} for m in image.host_mounts]
    temp = directory / ".image.json.new"
    temp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(temp, directory / "image.json")


def _build_error(template: Template, exc: Exception, root: Path) -> ImageBuildError:
    tail = exc.stderr if isinstance(exc, subprocess.CalledProcessError) else None
    return ImageBuildError(
        f"building the image for template '{template.name}' (base {template.base}) failed: {exc}",
        stderr_tail=tail,
        hint=f"check free space and permissions under {root}, then build again",
    )


def _retire(directory: Path) -> Path:
    """Move an image directory out of the way (one rename: readers see it or not)."""
    return directory.rename(
        tempfile.mkdtemp(prefix=f".old-{directory.name}-", dir=directory.parent)
    )


@contextlib.contextmanager
def _progress(enabled: bool, title: str) -> Iterator[rootfs.Log]:
    """A `Log` that shows each line under a spinner on stderr, or discards it."""
    if not enabled:
        yield lambda _line: None
        return
    from rich.console import Console
    from rich.markup import escape

    console = Console(stderr=True)
    last = ["done"]
    with console.status(escape(title)) as status:

        def log(line: str) -> None:
            if line.strip():
                last[0] = line.strip()
                status.update(f"{escape(title)}: {escape(last[0])}")

        yield log
    console.print(f"{escape(title)}: {escape(last[0])}")  # the summary line stays
