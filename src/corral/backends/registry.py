"""Backend lookup by name: built-ins first, then the `corral.backends` entry-point group."""

from __future__ import annotations

from importlib.metadata import entry_points

from corral.backends.base import Backend
from corral.config import Settings
from corral.errors import BackendUnavailableError

BUILTIN = ("oci", "podman", "microvm", "fake")


def available_backends() -> list[str]:
    names = set(BUILTIN)
    names.update(ep.name for ep in entry_points(group="corral.backends"))
    return sorted(names)


def load_backend(settings: Settings, name: str | None = None) -> Backend:
    """The backend `name` (default: settings.backend), configured from `settings`."""
    name = name or settings.backend
    if name == "oci":
        from corral.backends.oci import OciBackend

        return OciBackend(settings.state_dir, runtime=settings.oci.runtime)
    if name == "podman":
        from corral.backends.podman import PodmanBackend

        return PodmanBackend(settings.state_dir, runtime=settings.podman.runtime)
    if name == "microvm":
        try:
            from corral.backends.microvm.backend import MicrovmBackend
        except ImportError as exc:
            raise BackendUnavailableError(
                f"the microvm backend cannot be imported ({exc})",
                backend=name,
                hint="install its extra: pip install 'corral[microvm]' (qemu.qmp)",
            ) from exc
        micro = settings.microvm
        return MicrovmBackend(
            settings.state_dir, vmm=micro.vmm, cache_dir=micro.cache_dir, vmm_settings=micro
        )
    if name == "fake":
        from corral.backends.fake import FakeBackend

        return FakeBackend()
    for ep in entry_points(group="corral.backends", name=name):
        try:
            factory = ep.load()
        except ImportError as exc:
            raise BackendUnavailableError(
                f"backend '{name}' cannot be imported ({exc})",
                backend=name,
                hint=f"install its extra, e.g. pip install 'corral[{name}]'",
            ) from exc
        backend = factory(settings)
        if not isinstance(backend, Backend):
            raise BackendUnavailableError(f"entry point '{name}' did not give a Backend")
        return backend
    raise BackendUnavailableError(
        f"unknown backend '{name}'",
        backend=name,
        hint="choose one of: " + ", ".join(available_backends()),
    )
