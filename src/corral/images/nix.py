"""The `nix` builder: a template's rootfs from the flake's `<name>-oci` output.

`nix build` realizes `packages.<system>.<template>-oci` (a nixpkgs
dockerTools layered image, see nix/modules/sandbox.nix); its layers are
unpacked here into the rootfs, and the image store adds the skeleton and the
OCI layout as for every other base. Where Nix or nixpkgs is out of reach the
build fails, saying which.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import tarfile
from pathlib import Path, PurePosixPath

from corral.errors import ImageBuildError
from corral.images.rootfs import Log
from corral.spec.template import Template

NIX_FEATURES = ("--extra-experimental-features", "nix-command flakes")
_SYSTEMS = {"x86_64": "x86_64-linux", "aarch64": "aarch64-linux", "arm64": "aarch64-linux"}
_UNREACHABLE = ("unable to download", "could not resolve", "couldn't resolve", "cannot fetch",
                "unable to fetch", "network is unreachable", "timeout was reached")  # fmt: skip


def find_flake(environ: dict[str, str] | None = None) -> Path | None:
    """$CORRAL_FLAKE, else the checkout Corral runs from (when it has flake.nix)."""
    env = os.environ if environ is None else environ
    if env.get("CORRAL_FLAKE"):
        return Path(env["CORRAL_FLAKE"])
    checkout = Path(__file__).resolve().parents[3]
    return checkout if (checkout / "flake.nix").is_file() else None


class NixBuilder:
    """Builds the template's rootfs with Nix (see the module docstring)."""

    def __init__(self, template: Template, *, flake: Path | None = None) -> None:
        self.template = template
        self.flake = flake if flake is not None else find_flake()
        self.system = _SYSTEMS.get(platform.machine(), f"{platform.machine()}-linux")

    @property
    def attribute(self) -> str:
        return f"packages.{self.system}.{self.template.name}-oci"

    def inputs(self) -> dict[str, str]:
        lock = self.flake / "flake.lock" if self.flake else None
        digest = hashlib.sha256(lock.read_bytes()).hexdigest() if lock and lock.is_file() else ""
        return {"builder": "nix", "flake.lock": digest, "attribute": self.attribute}

    def populate(self, rootfs: Path, log: Log, epoch: int) -> None:
        nix = shutil.which("nix")
        if nix is None:
            raise ImageBuildError(
                "the nix builder needs Nix, which is not installed",
                hint="apt-get install nix-bin (Nix >= 2.8), or build with --builder default",
            )
        if self.flake is None:
            raise ImageBuildError(
                "no Corral flake found for the nix builder",
                hint="set CORRAL_FLAKE to a checkout of the Corral repository (it has flake.nix)",
            )
        # A plain directory reference: in a git checkout Nix copies only tracked files
        # (a "path:" reference would copy .venv and all).
        target = f"{self.flake}#{self.attribute}"
        log(f"nix build {target}")
        proc = subprocess.run(
            [nix, *NIX_FEATURES, "build", "--no-link", "--json", target],
            capture_output=True,
            text=True,
            timeout=3600,
            check=False,
        )
        if proc.returncode != 0:
            raise _nix_error(self, proc.stderr)
        try:  # --json, not --print-out-paths: Nix 2.8 (Debian 12) has only the former
            archive = Path(json.loads(proc.stdout)[0]["outputs"]["out"])
        except (ValueError, LookupError, TypeError):
            raise ImageBuildError(
                "nix build gave no output path", stderr_tail=proc.stdout[-500:]
            ) from None
        log(f"unpacking {archive}")
        import_docker_archive(archive, rootfs)


def _nix_error(builder: NixBuilder, stderr: str) -> ImageBuildError:
    text = stderr.lower()
    tail = stderr.strip()[-800:]
    if any(marker in text for marker in _UNREACHABLE):
        return ImageBuildError(
            "the flake's inputs (nixpkgs and the rest of flake.lock) cannot be fetched from "
            "this host, so the nix builder cannot build here",
            stderr_tail=tail,
            hint="build on a host that reaches GitHub and the Nix binary cache (or copy the "
            "closure in with `nix copy`), or use --builder default",
        )
    if "does not provide attribute" in text:
        return ImageBuildError(
            f"the flake has no output {builder.attribute}",
            stderr_tail=tail,
            hint="the flake builds the built-in templates; add yours to nix/templates.nix",
        )
    return ImageBuildError("nix build failed", stderr_tail=tail, hint="see Nix's message above")


def import_docker_archive(archive: Path, rootfs: Path) -> None:
    """Unpack the layers of a `docker save`-format archive (what dockerTools builds)
    into `rootfs`, applying whiteouts; nothing is written outside `rootfs`."""
    rootfs.mkdir(parents=True)
    with tarfile.open(archive) as outer:
        manifest_member = outer.extractfile("manifest.json")
        if manifest_member is None:
            raise ImageBuildError(f"{archive} has no manifest.json: not a docker archive")
        manifest = json.loads(manifest_member.read())
        for layer_name in manifest[0]["Layers"]:
            layer_file = outer.extractfile(layer_name)
            if layer_file is None:
                raise ImageBuildError(f"{archive}: layer {layer_name} is missing")
            with tarfile.open(fileobj=layer_file) as layer:
                _apply_layer(layer, rootfs)


def _apply_layer(layer: tarfile.TarFile, rootfs: Path) -> None:
    members = []
    for member in layer.getmembers():
        path = PurePosixPath(member.name.lstrip("/"))
        name = path.name
        if name.startswith(".wh."):
            _refuse_symlinked_parents(rootfs, path.parent)
        if name == ".wh..wh..opq":  # opaque dir: drop what lower layers put there
            target = rootfs / path.parent
            if target.is_dir():
                for child in target.iterdir():
                    _remove(child)
            continue
        if name.startswith(".wh."):
            _remove(rootfs / path.parent / name.removeprefix(".wh."))
            continue
        members.append(member)
    try:
        layer.extractall(rootfs, members=members, filter="tar")
    except tarfile.FilterError as exc:
        raise ImageBuildError(
            f"a layer tries to write outside the rootfs ({exc})",
            hint="the image is malformed or hostile; rebuild it",
        ) from None


def _refuse_symlinked_parents(rootfs: Path, relative: PurePosixPath) -> None:
    """A whiteout under a symlinked directory could delete files outside the rootfs."""
    current = rootfs
    for part in relative.parts:
        current = current / part
        if current.is_symlink():
            raise ImageBuildError(
                f"a layer whites out a path under the symlink /{relative}",
                hint="the image is malformed or hostile; rebuild it",
            )


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
