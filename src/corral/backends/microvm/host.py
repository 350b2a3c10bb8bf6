"""What this host offers a microVM: the accelerator QEMU can use and the TSC rate.

Kept free of QEMU's QMP library so `corral doctor` can ask without the extra.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from corral.errors import BackendUnavailableError

__all__ = ["Accelerator", "accelerator", "tsc_khz"]


@dataclass(frozen=True, slots=True)
class Accelerator:
    """How QEMU runs guest code here: `kvm` or `tcg`, with the reason for the choice."""

    name: Literal["kvm", "tcg"]
    reason: str


def accelerator(
    dev: Path = Path("/dev/kvm"), sys_module: Path = Path("/sys/module")
) -> Accelerator:
    """KVM when /dev/kvm is usable with hardware virtualization (kvm_intel/kvm_amd), else TCG.

    PVM (kvm_pvm) exposes /dev/kvm without VT-x/AMD-V and boots only PVM-enabled
    guest kernels, so a stock Debian kernel falls back to TCG there.
    """
    if not dev.exists():
        return Accelerator("tcg", f"{dev} does not exist (no KVM): TCG emulation")
    if not os.access(dev, os.R_OK | os.W_OK):
        return Accelerator("tcg", f"{dev} is not accessible to this user: TCG emulation")
    hardware = [name for name in ("kvm_intel", "kvm_amd") if (sys_module / name).is_dir()]
    if hardware:
        return Accelerator("kvm", f"{dev} with {hardware[0]}: hardware virtualization")
    if (sys_module / "kvm_pvm").is_dir():
        return Accelerator(
            "tcg", f"{dev} is PVM (kvm_pvm), which boots only PVM guest kernels: TCG emulation"
        )
    return Accelerator("tcg", f"{dev} has no kvm_intel/kvm_amd module loaded: TCG emulation")


def tsc_khz(cpuinfo: Path = Path("/proc/cpuinfo")) -> int:
    """The host TSC rate in kHz (the first `cpu MHz` line; constant-TSC hosts)."""
    match = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", cpuinfo.read_text(), re.MULTILINE)
    if match is None:
        raise BackendUnavailableError(
            "cannot read the host's TSC frequency from /proc/cpuinfo",
            backend="microvm",
            hint="the microvm backend needs an x86-64 host",
        )
    return math.floor(float(match[1]) * 1000)
