"""Registers the `kvm` marker for the real-VMM tier (until pyproject lists it)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "kvm: boots real guests under Firecracker / Cloud Hypervisor; needs the binaries and "
        "usable KVM (hardware virtualization), deselected by default",
    )
