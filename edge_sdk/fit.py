"""Whether a plan fits this device: the client's own check before it trains a plan.

The server plans within the budget a device registered with, but a device can resume with a
smaller budget (`--token T --memory-budget ...`), other apps can take its memory after it
profiled, and the server may be someone else's. So the client checks every plan it is given,
by the same predictions the server's planner uses (`hsplitlora.predict`), and refuses one that
would not fit, saying why, rather than be killed for memory in the middle of a round.
"""

from __future__ import annotations

from dataclasses import dataclass

from hsplitlora.cost import ModelDims, StepShape
from hsplitlora.planner import Plan
from hsplitlora.predict import DeviceRates, predict_step
from hsplitlora.wire import BYTES_PER_ELEMENT


class PlanDoesNotFit(RuntimeError):
    """The server's plan exceeds what this device can give (the message says what and by how much)."""


@dataclass(frozen=True)
class DeviceBudget:
    """What this device gives a training step, and its measurements when it profiled itself."""

    memory_bytes: float
    step_seconds: float | None = None
    profile: dict | None = None  # `hsplitlora profile`'s JSON (edge_sdk.profile.DeviceProfile.to_dict())

    def __post_init__(self):
        if not self.memory_bytes > 0:
            raise ValueError(f"the memory budget must be > 0 bytes, got {self.memory_bytes}")
        if self.step_seconds is not None and not self.step_seconds > 0:
            raise ValueError(f"the step-time budget must be > 0 seconds, got {self.step_seconds}")
        if self.step_seconds is not None and self.profile is None:
            raise ValueError("a step-time budget needs a device profile (`hsplitlora profile`, or --profile auto): "
                             "without measurements no step time can be predicted")

    def registration(self) -> dict:
        """The profile object registration sends: the measurements with this budget in them."""
        out = {**(self.profile or {}), "memory_bytes": float(self.memory_bytes)}
        if self.step_seconds is not None:
            out["step_seconds"] = float(self.step_seconds)
        return out


def plan_problem(plan: Plan, budget: DeviceBudget, dims: ModelDims, shape: StepShape, wire: str,
                 available_bytes: float | None = None) -> str | None:
    """Why `plan` does not fit `budget` on this device, or None when it fits.

    Without a profile the plan's analytic memory (`cost.device_memory`) is held against the
    budget; with one, the predicted peak resident memory of this process and the predicted step
    time, and, given `available_bytes` (what the process could reach now: its resident memory
    plus what the system has available), that too.
    """
    shown = f"split {plan.split} with {len(plan.ranks)} device adapters"
    mib = 2**20
    if budget.profile is None:
        need = plan.predicted_memory.total
        if need > budget.memory_bytes:
            return (f"the plan ({shown}) needs {need / mib:.0f} MiB of training memory; this device's budget is "
                    f"{budget.memory_bytes / mib:.0f} MiB")
        return None
    pred = predict_step(DeviceRates.from_profile(budget.profile), dims, plan.split, plan.ranks, shape,
                        BYTES_PER_ELEMENT[wire])
    if pred.peak_rss_bytes > budget.memory_bytes:
        return (f"the plan ({shown}) is predicted to peak at {pred.peak_rss_bytes / mib:.0f} MiB resident; this "
                f"device's budget is {budget.memory_bytes / mib:.0f} MiB")
    if budget.step_seconds is not None and pred.seconds > budget.step_seconds:
        return (f"the plan ({shown}) is predicted to take {pred.seconds:.2f} s per step; this device's budget is "
                f"{budget.step_seconds:.2f} s")
    if available_bytes is not None and pred.peak_rss_bytes > available_bytes:
        return (f"the plan ({shown}) is predicted to peak at {pred.peak_rss_bytes / mib:.0f} MiB resident; only "
                f"{available_bytes / mib:.0f} MiB are available to this process now")
    return None
