"""The sandbox lifecycle as an explicit state machine.

    CREATING ──> RUNNING <──> PAUSED
       │            │           │
       │            v           │
       │         STOPPED        │
       v            │           │
     FAILED         v           v
       └──────> DESTROYING <────┘ (from any state)
                    │
                    v
                DESTROYED

CREATING: the record exists, the backend is building the sandbox.
RUNNING: exec works. PAUSED: frozen. STOPPED: its main process is gone.
FAILED: create failed; its resources were already released.
DESTROYING: release in progress (a crash here is finished by `corral gc`).
"""

from __future__ import annotations

from enum import StrEnum

from corral.errors import InvalidStateError


class SandboxState(StrEnum):
    CREATING = "creating"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    FAILED = "failed"
    DESTROYING = "destroying"
    DESTROYED = "destroyed"


_ALLOWED: dict[SandboxState, frozenset[SandboxState]] = {
    SandboxState.CREATING: frozenset(
        {SandboxState.RUNNING, SandboxState.FAILED, SandboxState.DESTROYING}
    ),
    SandboxState.RUNNING: frozenset(
        {SandboxState.PAUSED, SandboxState.STOPPED, SandboxState.DESTROYING}
    ),
    SandboxState.PAUSED: frozenset(
        {SandboxState.RUNNING, SandboxState.STOPPED, SandboxState.DESTROYING}
    ),
    SandboxState.STOPPED: frozenset({SandboxState.RUNNING, SandboxState.DESTROYING}),
    SandboxState.FAILED: frozenset({SandboxState.DESTROYING}),
    SandboxState.DESTROYING: frozenset({SandboxState.DESTROYED}),
    SandboxState.DESTROYED: frozenset(),
}


def can_transition(current: SandboxState, target: SandboxState) -> bool:
    return target in _ALLOWED[current]


def check_transition(current: SandboxState, target: SandboxState, sandbox_id: str) -> None:
    """Raise InvalidStateError unless `current -> target` is an edge of the diagram."""
    if not can_transition(current, target):
        raise InvalidStateError(
            f"sandbox cannot go from {current} to {target}",
            sandbox_id=sandbox_id,
            hint="check its state with `corral inspect`",
        )
