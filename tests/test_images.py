"""The image store against the real host: real builds, real files, real tar bytes.

These run as root on Debian 12 (CI installs busybox-static and mmdebstrap), so
a missing tool fails the test instead of skipping it.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from corral.backends.base import HostMount
from corral.errors import ImageBuildError, NotFoundError
from corral.images import Image, ImageStore, oci_layout, skeleton
from corral.images.oci_layout import LAYER_MEDIA_TYPE, REF_NAME_ANNOTATION, host_architecture
from corral.images.rootfs import BusyboxBase
from corral.spec.template import Template, parse_template


def make_template(**fields: Any) -> Template:
    return parse_template({"name": "test", **fields}, source="test")


def blob(layout: Path, digest: str) -> bytes:
    algorithm, _, hexdigest = digest.partition(":")
    assert algorithm == "sha256"
    data = (layout / "blobs" / "sha256" / hexdigest).read_bytes()
    assert hashlib.sha256(data).hexdigest() == hexdigest, f"blob {digest} is corrupt"
    return data


def validate_layout(layout: Path) -> dict[str, Any]:
    """Walk index.json -> manifest -> config and layer; return what was found."""
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((layout / "index.json").read_text())
    assert index["schemaVersion"] == 2
    descriptor = index["manifests"][0]
    assert descriptor["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    manifest_bytes = blob(layout, descriptor["digest"])
    assert len(manifest_bytes) == descriptor["size"]
    manifest = json.loads(manifest_bytes)
    config_bytes = blob(layout, manifest["config"]["digest"])
    assert len(config_bytes) == manifest["config"]["size"]
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    config = json.loads(config_bytes)
    [layer] = manifest["layers"]
    assert layer["mediaType"] == LAYER_MEDIA_TYPE
    layer_bytes = blob(layout, layer["digest"])
    assert len(layer_bytes) == layer["size"]
    assert config["rootfs"] == {"type": "layers", "diff_ids": [layer["digest"]]}
    return {
        "digest": descriptor["digest"],
        "names": [m["annotations"][REF_NAME_ANNOTATION] for m in index["manifests"]],
        "config": config,
        "layer": layout / "blobs" / "sha256" / layer["digest"].removeprefix("sha256:"),
        "layer_size": layer["size"],
    }


def layer_members(image: Image) -> list[tarfile.TarInfo]:
    with tarfile.open(validate_layout(image.layout)["layer"]) as tar:
        return tar.getmembers()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images")


def test_host_base_has_skeleton_and_links_but_no_usr_copy(store: ImageStore) -> None:
    template = make_template(mounts=[{"source": "/srv", "target": "/opt/data"}])
    image = store.build(template)
    root = image.rootfs

    for name, expected in [("proc", 0o555), ("sys", 0o555), ("dev", 0o755), ("tmp", 0o1777)]:
        assert mode(root / name) == expected, name
    for name in ("etc", "home/sandbox", "work", ".corral", "opt/data"):
        assert (root / name).is_dir(), name
    assert list((root / ".corral").iterdir()) == []
    passwd = (root / "etc/passwd").read_text().splitlines()
    assert passwd == [
        "root:x:0:0:root:/root:/bin/sh",
        "sandbox:x:1000:1000:sandbox:/home/sandbox:/bin/sh",
    ]
    assert "sandbox:x:1000:" in (root / "etc/group").read_text().splitlines()
    hosts = (root / "etc/hosts").read_text()
    assert "127.0.0.1\tlocalhost" in hosts
    assert "::1\tlocalhost" in hosts
    assert (root / "etc/hostname").read_text() == "sandbox\n"
    nsswitch = (root / "etc/nsswitch.conf").read_text()
    assert "passwd: files" in nsswitch
    assert "hosts: files dns" in nsswitch

    # Merged /usr: the top-level links are recreated, /usr itself stays empty.
    for name in ("bin", "sbin", "lib", "lib64"):
        assert Path("/", name).is_symlink(), f"this test expects a merged-/usr host (/{name})"
        assert os.readlink(root / name) == os.readlink(Path("/", name))
    assert (root / "usr").is_dir()
    assert list((root / "usr").iterdir()) == []
    assert (root / "etc/ld.so.cache").read_bytes() == Path("/etc/ld.so.cache").read_bytes()
    assert (root / "etc/debian_version").read_text() == Path("/etc/debian_version").read_text()
    assert (root / "etc/os-release").read_text() == Path("/etc/os-release").read_text()
    host_alternatives = Path("/etc/alternatives")
    for link in host_alternatives.iterdir():
        if link.is_symlink():
            assert os.readlink(root / "etc/alternatives" / link.name) == os.readlink(link)
    assert image.layout == root.parent / "oci"
    assert image.size < 4 << 20, "the host base must not copy /usr"

    assert image.host_mounts == (HostMount(Path("/usr"), "/usr"),)
    assert (image.base, image.template, image.workdir, image.home) == (
        "host",
        "test",
        "/work",
        "/home/sandbox",
    )
    assert image.env["PATH"] == "/usr/local/bin:/usr/bin:/bin"
    ref = store.ref(image)
    assert (ref.digest, ref.rootfs, ref.layout, ref.uid, ref.gid) == (
        image.digest,
        root,
        image.layout,
        1000,
        1000,
    )


def test_root_user_lives_in_slash_root(store: ImageStore) -> None:
    image = store.build(make_template(user={"name": "root", "uid": 0, "gid": 0}))
    assert image.home == "/root"
    assert (image.rootfs / "etc/passwd").read_text() == "root:x:0:0:root:/root:/bin/sh\n"
    assert mode(image.rootfs / "root") == 0o700


def test_layout_is_a_valid_oci_image(store: ImageStore) -> None:
    template = make_template(env={"FOO": "bar"}, workdir="/src", user={"uid": 1234, "gid": 99})
    image = store.build(template)
    found = validate_layout(image.layout)
    assert found["digest"] == image.digest
    assert found["names"] == ["test"]
    assert found["layer_size"] == image.size
    config = found["config"]
    assert config["architecture"] == host_architecture()
    assert config["os"] == "linux"
    assert config["config"]["WorkingDir"] == "/src"
    assert config["config"]["User"] == "1234:99"
    assert "FOO=bar" in config["config"]["Env"]


def test_files_are_written_with_their_modes(store: ImageStore) -> None:
    template = make_template(
        files=[
            {"path": "/opt/tools/run.sh", "content": "#!/bin/sh\necho hi\n", "mode": "0755"},
            {"path": "/etc/secret", "content": "s3cret", "mode": "0600"},
            {"path": "/etc/hosts", "content": "10.0.0.1 db\n"},
        ]
    )
    image = store.build(template)
    run = image.rootfs / "opt/tools/run.sh"
    assert run.read_text() == "#!/bin/sh\necho hi\n"
    assert mode(run) == 0o755
    assert mode(image.rootfs / "etc/secret") == 0o600
    assert (image.rootfs / "etc/hosts").read_text() == "10.0.0.1 db\n"  # files win
    members = {m.name.rstrip("/"): m for m in layer_members(image)}
    assert members["opt/tools/run.sh"].mode == 0o755
    assert members["etc/secret"].mode == 0o600
    assert members["tmp"].mode == 0o1777


@pytest.mark.parametrize(
    ("path", "message"),
    [("/bin/tool", "goes through the symlink '/bin'"), ("/usr/local/bin/tool", "under /usr")],
)
def test_files_that_would_be_hidden_or_escape_are_refused(
    store: ImageStore, path: str, message: str
) -> None:
    template = make_template(files=[{"path": path, "content": "x"}])
    with pytest.raises(ImageBuildError, match=message) as caught:
        store.build(template)
    assert caught.value.hint
    assert [p.name for p in store.root.iterdir()] == [".locks"]


def test_builds_are_reproducible(tmp_path: Path) -> None:
    environ = {"SOURCE_DATE_EPOCH": "1700000000"}
    template = make_template(files=[{"path": "/opt/a", "content": "a"}])
    first = ImageStore(tmp_path / "one", environ=environ).build(template)
    second = ImageStore(tmp_path / "two", environ=environ).build(template)
    assert first.digest == second.digest
    assert first.rootfs != second.rootfs
    rebuilt = ImageStore(tmp_path / "one", environ=environ).build(template, force=True)
    assert rebuilt.digest == first.digest

    members = layer_members(first)
    names = [m.name.rstrip("/") for m in members]
    assert names == sorted(names, key=os.fsencode)
    assert "etc/passwd" in names
    assert {m.mtime for m in members} == {1700000000}
    assert {(m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, "", "")}
    assert validate_layout(first.layout)["config"]["created"] == "2023-11-14T22:13:20Z"


def test_cache_hit_returns_the_same_image_without_building(
    store: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    template = make_template()
    first = store.build(template)
    before = first.rootfs.parent.stat()

    def no_rebuild(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cache hit must not write a layout")

    monkeypatch.setattr(oci_layout, "write_layout", no_rebuild)
    again = store.build(template)
    assert again == first
    assert store.get(template) == first
    after = again.rootfs.parent.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    monkeypatch.undo()

    forced = store.build(template, force=True)
    assert forced.digest == first.digest
    assert forced.rootfs.parent.stat().st_ino != before.st_ino
    assert [image.key for image in store.list()] == [first.key]


def test_get_is_none_before_a_build(store: ImageStore) -> None:
    assert store.get(make_template()) is None
    assert store.list() == []


def test_templates_differing_only_in_name_share_an_image(store: ImageStore) -> None:
    first = store.build(make_template(name="alpha"))
    second = store.build(make_template(name="beta"))
    assert (second.key, second.digest, second.template) == (first.key, first.digest, "alpha")
    assert second.names == ("alpha", "beta")
    assert validate_layout(second.layout)["names"] == ["alpha", "beta"]
    assert store.list() == [second]
    store.remove("beta")
    assert store.list() == []


def test_busybox_base(store: ImageStore) -> None:
    image = store.build(make_template(base="busybox"))
    root = image.rootfs
    assert (root / "bin/busybox").read_bytes() == Path("/usr/bin/busybox").read_bytes()
    assert mode(root / "bin/busybox") == 0o755
    assert os.readlink(root / "bin/sh") == "busybox"
    assert os.readlink(root / "bin/ls") == "busybox"
    assert image.host_mounts == ()
    assert "sandbox:x:1000:1000:sandbox:/home/sandbox:/bin/sh" in (root / "etc/passwd").read_text()
    result = subprocess.run(
        ["chroot", str(root), "/bin/sh", "-c", "id sandbox && ls /work && echo ok"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "uid=1000(sandbox) gid=1000(sandbox) groups=1000(sandbox)\nok\n"
    validate_layout(image.layout)


def test_busybox_must_be_static() -> None:
    with pytest.raises(ImageBuildError, match="dynamically linked") as caught:
        BusyboxBase(Path("/usr/bin/ls")).inputs()
    assert caught.value.hint == "apt-get install busybox-static"
    with pytest.raises(ImageBuildError, match="needs /nonexistent/busybox"):
        BusyboxBase(Path("/nonexistent/busybox")).inputs()


def test_failed_build_leaves_nothing_and_keeps_the_cached_image(
    store: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    template = make_template()
    cached = store.build(template)

    def broken(rootfs: Path, template: Template) -> None:
        (rootfs / "half-written").write_text("x")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(skeleton, "write_skeleton", broken)
    for force, target in [(True, template), (False, make_template(workdir="/elsewhere"))]:
        with pytest.raises(ImageBuildError, match="No space left on device") as caught:
            store.build(target, force=force)
        assert "template 'test'" in str(caught.value)
        assert caught.value.hint is not None
        assert "free space" in caught.value.hint
    assert sorted(p.name for p in store.root.iterdir()) == [".locks", cached.key]
    assert store.get(template) == cached


def test_remove_by_name_and_digest_prefix(store: ImageStore) -> None:
    one = store.build(make_template(name="one"))
    two = store.build(make_template(name="two", workdir="/other"))
    assert {image.template for image in store.list()} == {"one", "two"}

    store.remove("one")
    assert [image.template for image in store.list()] == ["two"]
    assert not one.rootfs.exists()
    with pytest.raises(NotFoundError):
        store.remove(two.digest.removeprefix("sha256:")[:11])  # too short to be a prefix
    store.remove(two.digest[: len("sha256:") + 12])
    assert store.list() == []
    assert not two.rootfs.exists()
    assert sorted(p.name for p in store.root.iterdir()) == [".locks"]


def test_remove_unknown_is_not_found(store: ImageStore) -> None:
    with pytest.raises(NotFoundError, match="no image matches 'nope'") as caught:
        store.remove("nope")
    assert caught.value.hint


def test_progress_is_shown_on_stderr(store: ImageStore, capsys: pytest.CaptureFixture[str]) -> None:
    image = store.build(make_template(), progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert image.digest[:19] in captured.err


@pytest.mark.slow
def test_debian_base_with_packages(store: ImageStore) -> None:
    template = make_template(base="debian:bookworm", packages=["hello"])
    image = store.build(template)
    root = image.rootfs
    assert (root / "usr/bin/hello").is_file()
    passwd = (root / "etc/passwd").read_text().splitlines()
    assert passwd[0] == "root:x:0:0:root:/root:/bin/sh"
    assert passwd[-1] == "sandbox:x:1000:1000:sandbox:/home/sandbox:/bin/sh"
    assert any(line.startswith("_apt:") for line in passwd), "Debian's own accounts are kept"
    assert (root / "etc/hostname").read_text() == "sandbox\n"
    assert image.host_mounts == ()
    found = validate_layout(image.layout)
    assert found["digest"] == image.digest
    with tarfile.open(found["layer"]) as tar:
        assert tar.getmember("usr/bin/hello").isfile()
    result = subprocess.run(
        ["chroot", str(root), "/usr/bin/hello"], capture_output=True, text=True, check=False
    )
    assert result.stdout == "Hello, world!\n", result.stderr
