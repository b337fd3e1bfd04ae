"""Stateful schedules, checkpointed by the train stage: TAID's interpolation weight t and the learning rate."""
from __future__ import annotations

import math


class TAIDSchedule:
    """TAID's adaptive interpolation weight t (Shing et al., ICLR 2025; SakanaAI/TAID defaults).

    Once per optimiser step, with J the detached distillation objective of that step and s the optimiser steps
    done before it (update() is called with s + 1, the steps done so far):
      first call: store J (t stays at t_start);
      delta = (J_prev - J) / (J_prev + 1e-15);  m <- beta m + (1 - beta) delta
      t_lin = t_start + (t_end - t_start) * s / total_steps
      t <- min(t_end, max(t_lin, t + alpha * sigmoid(m) * (1 - t)));  J_prev <- J
    The floor's s is the reference's (SakanaAI/TAID updates t inside the forward, where Lightning's global_step
    counts the steps before the current one), so t matches it exactly rather than running (t_end - t_start) /
    total_steps ahead; t_end is reached by the floor after the last step, as there.
    So t never decreases, never drops below the linear schedule and never exceeds t_end; it moves faster while
    the objective is falling. adaptive=False gives the linear schedule t = min(t_end, t_lin).
    A non-finite J (a diverged step) leaves the state untouched rather than poisoning the momentum forever.

    extend(step, total_steps) raises the horizon of a run resumed at `step` (train.max_steps raised): the linear
    floor then runs from its value at `step` to t_end at the new total, so it stays continuous and never falls.
    """

    def __init__(self, total_steps: int, t_start: float = 0.4, t_end: float = 1.0, alpha: float = 5e-4,
                 beta: float = 0.99, adaptive: bool = True):
        if not (isinstance(total_steps, int) and total_steps >= 1):
            raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
        if not 0.0 <= t_start <= t_end <= 1.0:
            raise ValueError(f"need 0 <= t_start <= t_end <= 1, got t_start={t_start}, t_end={t_end}")
        if not (0.0 <= alpha <= 1.0 and 0.0 <= beta < 1.0):
            raise ValueError(f"need alpha in [0, 1] and beta in [0, 1), got alpha={alpha}, beta={beta}")
        self.total_steps, self.t_start, self.t_end = total_steps, t_start, t_end
        self.alpha, self.beta, self.adaptive = alpha, beta, adaptive
        self.t = t_start
        self.momentum = 0.0
        self.prev_objective: float | None = None
        # where the linear floor starts: (0, t_start), or the step and floor value of the last extend()
        self.floor_step, self.floor_t = 0, t_start

    def linear(self, step: int) -> float:
        span = self.total_steps - self.floor_step
        return self.floor_t + (self.t_end - self.floor_t) * max(0, min(step, self.total_steps) - self.floor_step) / span

    def extend(self, step: int, total_steps: int) -> None:
        """A longer run, resumed after `step` steps: the floor goes on from linear(step) to t_end at total_steps."""
        if total_steps <= self.total_steps or step > self.total_steps:
            raise ValueError(f"extend needs step <= {self.total_steps} < total_steps, got {step}, {total_steps}")
        self.floor_t, self.floor_step = self.linear(step), step
        self.total_steps = total_steps

    def update(self, step: int, objective_value: float) -> float:
        """Advance t after optimiser step `step` (steps done so far) whose objective was objective_value.
        Returns the new t."""
        floor = self.linear(step - 1)  # the steps done before this one: the reference's global_step
        if not self.adaptive:
            self.t = min(self.t_end, floor)
            return self.t
        j = float(objective_value)
        if not math.isfinite(j):
            return self.t
        if self.prev_objective is None:
            self.prev_objective = j
            return self.t
        delta = (self.prev_objective - j) / (self.prev_objective + 1e-15)
        self.momentum = self.beta * self.momentum + (1 - self.beta) * delta
        sigmoid_m = 1.0 / (1.0 + math.exp(-self.momentum))
        self.t = min(self.t_end, max(floor, self.t + self.alpha * sigmoid_m * (1 - self.t)))
        self.prev_objective = j
        return self.t

    def state_dict(self) -> dict:
        """Plain Python values (JSON- and torch.save-friendly)."""
        return {"t": self.t, "momentum": self.momentum, "prev_objective": self.prev_objective,
                "total_steps": self.total_steps, "t_start": self.t_start, "t_end": self.t_end,
                "alpha": self.alpha, "beta": self.beta, "adaptive": self.adaptive,
                "floor_step": self.floor_step, "floor_t": self.floor_t}

    def load_state_dict(self, state: dict) -> None:
        # the hyper-parameters travel with the state so a resumed run continues the same schedule exactly
        for key in ("total_steps", "t_start", "t_end", "alpha", "beta", "adaptive"):
            if key in state:
                setattr(self, key, state[key])
        # states saved before extend() existed start the floor at (0, t_start)
        self.floor_step = state.get("floor_step", 0)
        self.floor_t = state.get("floor_t", self.t_start)
        self.t = float(state["t"])
        self.momentum = float(state["momentum"])
        self.prev_objective = None if state["prev_objective"] is None else float(state["prev_objective"])


class WarmupCosineLR:
    """Linear warm-up to peak_lr over warmup_steps, then cosine decay to min_lr_ratio * peak_lr at total_steps.

    lr(step) is a pure function of the step (0-based: the first optimiser step uses lr(0) = peak_lr / warmup_steps,
    never 0); state_dict carries the configuration so a resume reproduces the schedule.

    extend(step, total_steps) raises the horizon of a run resumed at `step` (train.max_steps raised) and keeps the
    LR continuous: from `step` on, a cosine runs from lr(step) -- the LR the old schedule gives that step -- down to
    the minimum at the new total. So a finished run (already at the minimum) continues at the minimum LR, a run
    stopped half-way decays from where it was over the longer horizon, and one still in warm-up finishes its
    warm-up and then decays over the new horizon. Nothing re-warms: the LR never jumps up at a resume.
    """

    def __init__(self, peak_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1):
        if peak_lr < 0 or warmup_steps < 0 or total_steps < 1 or not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"bad LR schedule: peak_lr={peak_lr}, warmup_steps={warmup_steps}, "
                             f"total_steps={total_steps}, min_lr_ratio={min_lr_ratio}")
        self.peak_lr, self.warmup_steps = peak_lr, warmup_steps
        self.total_steps, self.min_lr_ratio = total_steps, min_lr_ratio
        # where the cosine starts and from which LR: the end of warm-up at peak_lr, or the last extend()
        self.decay_start, self.decay_lr = warmup_steps, peak_lr

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.decay_start)
        progress = min(1.0, max(0, step - self.decay_start) / decay_steps)
        min_lr = self.peak_lr * self.min_lr_ratio
        return min_lr + (self.decay_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))

    def extend(self, step: int, total_steps: int) -> None:
        """A longer run, resumed after `step` steps: cosine from lr(step) at `step` to the minimum at total_steps."""
        if total_steps <= self.total_steps or step > self.total_steps:
            raise ValueError(f"extend needs step <= {self.total_steps} < total_steps, got {step}, {total_steps}")
        if step > self.decay_start:  # during warm-up (or at the cosine's start) only the horizon moves
            self.decay_start, self.decay_lr = step, self.lr(step)
        self.total_steps = total_steps

    def state_dict(self) -> dict:
        return {"peak_lr": self.peak_lr, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
                "min_lr_ratio": self.min_lr_ratio, "decay_start": self.decay_start, "decay_lr": self.decay_lr}

    def load_state_dict(self, state: dict) -> None:
        self.peak_lr, self.warmup_steps = state["peak_lr"], state["warmup_steps"]
        self.total_steps, self.min_lr_ratio = state["total_steps"], state["min_lr_ratio"]
        # states saved before extend() existed: the cosine starts at the end of warm-up
        self.decay_start = state.get("decay_start", self.warmup_steps)
        self.decay_lr = state.get("decay_lr", self.peak_lr)
