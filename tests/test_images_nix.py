"""The nix image builder: docker-archive import, and clear errors where Nix cannot build."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from corral.errors import ImageBuildError
from corral.images import ImageStore
from corral.images.nix import NixBuilder, import_docker_archive
from corral.spec.template import load_template

REPO = Path(__file__).resolve().parent.parent


def _layer(entries: list[tuple[str, bytes | None, str | None]]) -> bytes:
    """A layer tar: (name, file content, symlink target); both None means a directory."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, content, link in entries:
            info = tarfile.TarInfo(name)
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            elif content is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def _archive(path: Path, layers: list[bytes]) -> Path:
    names = [f"layer{i}/layer.tar" for i in range(len(layers))]
    manifest = json.dumps([{"Config": "config.json", "RepoTags": [], "Layers": names}]).encode()
    with tarfile.open(path, "w:gz") as tar:
        for name, data in [("manifest.json", manifest), *zip(names, layers, strict=True)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def built_entries(root: Path) -> list[str]:
    """What a build left in the store, lock files aside."""
    return [p.name for p in root.iterdir() if p.name != ".locks"]


def test_import_applies_layers_and_whiteouts(tmp_path: Path) -> None:
    base = _layer([
        ("etc", None, None), ("etc/keep", b"keep", None), ("etc/gone", b"x", None),
        ("opt", None, None), ("opt/old", b"old", None),
        ("bin", None, None), ("bin/sh", None, "/nix/store/abc-bash/bin/bash"),
    ])  # fmt: skip
    top = _layer([
        ("etc/.wh.gone", b"", None), ("opt/.wh..wh..opq", b"", None), ("opt/new", b"new", None),
    ])  # fmt: skip
    rootfs = tmp_path / "rootfs"
    import_docker_archive(_archive(tmp_path / "image.tar.gz", [base, top]), rootfs)
    assert (rootfs / "etc/keep").read_bytes() == b"keep"
    assert not (rootfs / "etc/gone").exists()
    assert sorted(p.name for p in (rootfs / "opt").iterdir()) == ["new"]
    # Store paths are absolute symlinks in Nix images; they stay as they are.
    assert (rootfs / "bin/sh").readlink() == Path("/nix/store/abc-bash/bin/bash")


def test_import_refuses_to_write_outside(tmp_path: Path) -> None:
    (tmp_path / "victim").write_text("safe")
    escape = _layer([("../victim", b"owned", None)])
    with pytest.raises(ImageBuildError, match="outside the rootfs"):
        import_docker_archive(_archive(tmp_path / "a.tar.gz", [escape]), tmp_path / "r1")
    assert (tmp_path / "victim").read_text() == "safe"
    host_dir = tmp_path / "host"
    host_dir.mkdir()
    (host_dir / "file").write_text("safe")
    link = _layer([("etc", None, str(host_dir))])
    whiteout = _layer([("etc/.wh.file", b"", None)])
    with pytest.raises(ImageBuildError, match="symlink"):
        import_docker_archive(_archive(tmp_path / "b.tar.gz", [link, whiteout]), tmp_path / "r2")
    assert (host_dir / "file").read_text() == "safe"


def test_without_nix_the_error_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nix on it
    store = ImageStore(tmp_path / "images")
    with pytest.raises(ImageBuildError, match="needs Nix") as info:
        store.build(load_template("default"), builder="nix")
    assert info.value.hint is not None
    assert "nix-bin" in info.value.hint
    assert [
        p.name for p in (tmp_path / "images").iterdir() if not p.name.startswith(".locks")
    ] == []


def test_unreachable_nixpkgs_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Real Nix on the real flake, run in an empty network namespace of our own (no
    # traffic leaves the machine): the flake's inputs cannot be fetched.
    real_nix = shutil.which("nix")
    if real_nix is None:
        pytest.fail("nix is not installed: apt-get install nix-bin (scripts/setup does)")
    wrapper_dir = tmp_path / "bin"
    wrapper_dir.mkdir()
    wrapper = wrapper_dir / "nix"
    wrapper.write_text(f'#!/bin/sh\nexec unshare --net {real_nix} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("CORRAL_FLAKE", str(REPO))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv(
        "NIX_CONFIG", "build-users-group =\nconnect-timeout = 5\ndownload-attempts = 1"
    )
    builder = NixBuilder(load_template("default"))
    assert builder.attribute.endswith(".default-oci")
    store = ImageStore(tmp_path / "images")
    with pytest.raises(ImageBuildError, match="cannot be fetched") as info:
        store.build(load_template("default"), builder="nix")
    assert info.value.hint is not None
    assert "--builder default" in info.value.hint
    assert [
        p.name for p in (tmp_path / "images").iterdir() if not p.name.startswith(".locks")
    ] == []
