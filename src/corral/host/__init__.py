"""Host readiness: `doctor` says what this host can run, `prepare` fixes what it safely can."""

from __future__ import annotations

from corral.host.doctor import Check, checks_to_json, format_checks, run_checks
from corral.host.prepare import Action, prepare_host

__all__ = ["Action", "Check", "checks_to_json", "format_checks", "prepare_host", "run_checks"]
