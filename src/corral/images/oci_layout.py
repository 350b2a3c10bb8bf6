"""Write a rootfs directory as a reproducible, single-layer OCI image layout.

The same rootfs and settings always give the same bytes, hence the same
manifest digest: tar entries are sorted, owned by 0:0 with no user names, and
stamped with SOURCE_DATE_EPOCH; every JSON document is canonical.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = [
    "LAYER_MEDIA_TYPE",
    "REF_NAME_ANNOTATION",
    "LayoutResult",
    "add_ref_name",
    "host_architecture",
    "source_date_epoch",
    "write_layout",
]

LAYOUT_VERSION = "1.0.0"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"

# Go's GOARCH names, which OCI uses, for what `uname -m` says.
_ARCHITECTURES = {
    "x86_64": "amd64",
    "aarch64": "arm64",
    "armv7l": "arm",
    "i686": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


@dataclass(frozen=True, slots=True)
class LayoutResult:
    """What `write_layout` produced: the image digest and its one layer."""

    digest: str  # "sha256:<hex>" of the manifest: the image's identity
    layer_digest: str  # also the config's diff_id, since the layer is uncompressed
    layer_size: int


def host_architecture() -> str:
    """The OCI architecture name of this host (e.g. "amd64")."""
    machine = platform.machine()
    return _ARCHITECTURES.get(machine, machine)


def source_date_epoch(environ: Mapping[str, str] | None = None) -> int:
    """The timestamp stamped on every tar entry: SOURCE_DATE_EPOCH, or 0."""
    value = (os.environ if environ is None else environ).get("SOURCE_DATE_EPOCH", "")
    return int(value) if value.strip().isdigit() else 0


def write_layout(
    rootfs: Path,
    layout: Path,
    *,
    name: str,
    env: Mapping[str, str],
    workdir: str,
    uid: int,
    gid: int,
    epoch: int,
) -> LayoutResult:
    """Write `rootfs` as an OCI image layout in the (new) directory `layout`.

    `name` becomes the index's ref.name annotation; it does not change the
    digest. `epoch` is the mtime of every entry and the config's `created`.
    """
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    layer_digest, layer_size = _write_layer(rootfs, blobs, epoch)
    config = {
        "architecture": host_architecture(),
        "os": "linux",
        "created": datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "config": {
            "Env": [f"{key}={value}" for key, value in env.items()],
            "WorkingDir": workdir,
            "User": f"{uid}:{gid}",
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": _write_json_blob(blobs, config, CONFIG_MEDIA_TYPE),
        "layers": [{"mediaType": LAYER_MEDIA_TYPE, "digest": layer_digest, "size": layer_size}],
    }
    manifest_descriptor = _write_json_blob(blobs, manifest, MANIFEST_MEDIA_TYPE)
    manifest_descriptor["annotations"] = {REF_NAME_ANNOTATION: name}
    index = {"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": [manifest_descriptor]}
    (layout / "index.json").write_bytes(_canonical(index))
    (layout / "oci-layout").write_bytes(_canonical({"imageLayoutVersion": LAYOUT_VERSION}))
    return LayoutResult(
        digest=str(manifest_descriptor["digest"]),
        layer_digest=layer_digest,
        layer_size=layer_size,
    )


def add_ref_name(layout: Path, name: str) -> None:
    """Also list the image under `name` in the layout's index (same manifest).

    Templates that differ only in name share one image; each name gets an
    index entry so OCI tools find the image by any of them.
    """
    index_path = layout / "index.json"
    index = json.loads(index_path.read_text())
    manifests: list[dict[str, Any]] = index["manifests"]
    if any(m.get("annotations", {}).get(REF_NAME_ANNOTATION) == name for m in manifests):
        return
    manifests.append({**manifests[0], "annotations": {REF_NAME_ANNOTATION: name}})
    temp = index_path.with_name(".index.json.new")
    temp.write_bytes(_canonical(index))
    os.replace(temp, index_path)


def _write_layer(rootfs: Path, blobs: Path, epoch: int) -> tuple[str, int]:
    fd, temp_name = tempfile.mkstemp(dir=blobs, prefix=".layer-")
    os.close(fd)
    temp = Path(temp_name)
    try:
        with tarfile.open(temp, "w", format=tarfile.PAX_FORMAT) as tar:
            for relative in _sorted_paths(rootfs):
                _add_entry(tar, rootfs / relative, relative, epoch)
        with temp.open("rb") as layer:
            digest = hashlib.file_digest(layer, "sha256").hexdigest()
        size = temp.stat().st_size
        os.chmod(temp, 0o644)
        os.rename(temp, blobs / digest)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return f"sha256:{digest}", size


def _sorted_paths(rootfs: Path) -> list[str]:
    """Every path under `rootfs`, relative, sorted bytewise.

    A plain sort keeps each directory before its contents (a prefix sorts
    first), which is all tar extraction needs, and makes the order independent
    of the filesystem's readdir order.
    """
    paths: list[str] = []
    for directory, dirnames, filenames in os.walk(rootfs, onerror=_raise):
        base = os.path.relpath(directory, rootfs)
        for entry in (*dirnames, *filenames):
            paths.append(entry if base == "." else f"{base}/{entry}")
    return sorted(paths, key=os.fsencode)


def _raise(error: OSError) -> None:
    raise error


def _add_entry(tar: tarfile.TarFile, path: Path, arcname: str, epoch: int) -> None:
    info = tar.gettarinfo(str(path), arcname=arcname)
    if info is None:  # sockets cannot be archived and mean nothing in an image
        return
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = epoch
    if info.isreg():
        with path.open("rb") as data:
            tar.addfile(info, data)
    else:
        tar.addfile(info)


def _canonical(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def _write_json_blob(blobs: Path, document: Mapping[str, Any], media_type: str) -> dict[str, Any]:
    data = _canonical(document)
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}
