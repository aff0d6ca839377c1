"""Staged rollout: push to a few canary devices first, then to batches, and stop once failures exceed a limit.

Each stage is one transfer addressed to the stage's devices on their own topics (a group topic would reach
every member at once). Devices never reached because the rollout stopped are reported as `skipped`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgecv.agent.contract import topics as T
from edgecv.agent.contract.transfer import DEFAULT_CHUNK_SIZE
from edgecv.tools.errors import FleetError
from edgecv.tools.fleet.mqtt_client import ClientOptions
from edgecv.tools.fleet.push import DeviceResult, Pusher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RolloutPlan:
    canary: int = 0  # devices in the first stage (0 = no canary stage)
    batch_size: int = 0  # devices per later stage (0 = all remaining at once)
    max_failures: int = 0  # stop after more failures than this

    def stages(self, devices: Sequence[str]) -> list[list[str]]:
        if self.canary < 0 or self.batch_size < 0 or self.max_failures < 0:
            raise FleetError("--canary, --batch-size and --max-failures must be >= 0")
        devices = list(devices)
        out = [devices[:self.canary]] if self.canary else []
        rest = devices[self.canary:]
        size = self.batch_size or len(rest) or 1
        out += [rest[i:i + size] for i in range(0, len(rest), size)]
        return [s for s in out if s]


def rollout(options: ClientOptions, archive: bytes, name: str, version: str, devices: Sequence[str],
            plan: RolloutPlan, *, prefix: str = T.DEFAULT_PREFIX, chunk_size: int = DEFAULT_CHUNK_SIZE,
            timeout: float = 120.0, progress: Callable[[int], None] | None = None,
            on_stage: Callable[[int, list[str]], None] | None = None,
            allow_downgrade: bool = False, grant_key: Ed25519PrivateKey | None = None,
            wait_probation: bool = False) -> list[DeviceResult]:
    """Push stage by stage; `timeout` applies to each stage. Returns one result per device, in order."""
    results: dict[str, DeviceResult] = {}
    failures = 0
    stages = plan.stages(devices)
    for n, stage in enumerate(stages):
        if failures > plan.max_failures:
            for d in stage:
                results[d] = DeviceResult(d, state="skipped",
                                          error=f"Rollout stopped after {failures} failure(s) (--max-failures "
                                                f"{plan.max_failures})")
            continue
        if on_stage is not None:
            on_stage(n, stage)
        log.debug("Rollout stage %d/%d: %s", n + 1, len(stages), ", ".join(stage))
        pusher = Pusher(options, archive, name, version, prefix=prefix, chunk_size=chunk_size, timeout=timeout,
                        progress=progress, allow_downgrade=allow_downgrade, grant_key=grant_key,
                        wait_probation=wait_probation)
        for res in pusher.push(stage):
            results[res.device] = res
            failures += 0 if res.ok else 1
    return [results[d] for d in devices]
