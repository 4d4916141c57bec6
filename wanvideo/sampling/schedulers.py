"""Flow-matching sigma schedules and solvers for Wan 2.1 (rectified flow, velocity prediction).

Conventions (those of Wan 2.1, ComfyUI's ModelSamplingDiscreteFlow and diffusers):
  x_sigma = (1 - sigma) * x0 + sigma * noise,    sigma from ~1 (noise) down to 0 (data);
  the model predicts the velocity v = noise - x0 = dx/dsigma, so x0 = x - sigma * v;
  the model timestep is t = sigma * 1000.

The default schedule is Wan 2.1's own (`wan/text2video.py` with FlowUniPCMultistepScheduler): a linear
grid linspace(1 - 1/1000, 0, steps + 1)[:-1], bent by the shift sigma' = shift*s / (1 + (shift-1)*s),
and a final 0. diffusers' DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift) builds
exactly this grid, and FlowMatchEulerDiscreteScheduler(shift=shift) does when handed the unshifted grid.
diffusers' UniPCMultistepScheduler(use_flow_sigmas=True) moves the grid up by 1/1000 before the shift (it
starts at 1 - 1e-6 instead of shift(0.999)): sigmas differ by at most shift/1000. The default grid of
FlowMatchEulerDiscreteScheduler(shift=...) (= ComfyUI's 'normal' scheduler) is another one: linspace from
1 to shift(1/1000) over `steps` points, shifted again. ComfyUI's 'simple' is about shift(linspace(1, 0, steps + 1)).
All of these are the same curve sampled a little differently.

Solvers share one interface: built from the sigmas, `step(velocity, x, step_index) -> x_next`, called
once per step in order. Multistep solvers keep the previous x0 predictions, so use a fresh solver for
each generation.
"""
import logging
import math

import torch

logger = logging.getLogger(__name__)

__all__ = ["flow_sigmas", "shift_sigmas", "FlowScheduler", "FlowEulerScheduler", "FlowUniPCScheduler",
           "FlowDPMPP2MScheduler", "SCHEDULERS", "make_scheduler"]

NUM_TRAIN_TIMESTEPS = 1000
# diffusers' guard against sigma = 1 (infinite log-SNR); the solvers that need log-SNR apply it too.
SIGMA_ONE_EPS = 1e-6


def shift_sigmas(sigmas, shift):
    """sigma' = shift * sigma / (1 + (shift - 1) * sigma): shift > 1 spends more steps at high noise."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_sigmas(steps, shift, denoise=1.0):
    """The Wan 2.1 sigma schedule: float64 tensor [steps + 1], decreasing from shift(0.999) to 0.

    denoise < 1 (video-to-video) follows ComfyUI: the schedule of int(steps / denoise) steps, of which
    the last steps + 1 sigmas are kept, so `steps` model evaluations still run, starting at a lower
    noise level.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps!r}.")
    if not (isinstance(shift, (int, float)) and shift > 0 and math.isfinite(shift)):
        raise ValueError(f"shift must be a positive number (Wan 2.1 uses 3.0 to 12.0); got {shift!r}.")
    if not (isinstance(denoise, (int, float)) and 0 < denoise <= 1):
        raise ValueError(f"denoise must be in (0, 1]; got {denoise!r}. Use 1.0 to generate from pure noise.")
    total_steps = steps if denoise >= 1 else int(steps / denoise)
    grid = torch.linspace(1 - 1 / NUM_TRAIN_TIMESTEPS, 0, total_steps + 1, dtype=torch.float64)[:-1]
    sigmas = torch.cat([shift_sigmas(grid, float(shift)), grid.new_zeros(1)])
    return sigmas[-(steps + 1):]


def _log_snr(sigma):
    """lambda = log(alpha / sigma) with alpha = 1 - sigma; +inf at sigma = 0."""
    return math.inf if sigma == 0 else math.log((1 - sigma) / sigma)


class FlowScheduler:
    """Common interface: `sigmas` [steps + 1] (float64, decreasing), `timesteps` [steps] for the model,
    and `step(velocity, x, step_index) -> x_next` for tensors of any shape (all on one device)."""

    def __init__(self, sigmas):
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu()
        if sigmas.numel() < 2:
            raise ValueError(f"A schedule needs at least 2 sigmas (one step); got {sigmas.numel()}.")
        if not (sigmas[:-1] > sigmas[1:]).all() or sigmas[-1] < 0 or sigmas[0] > 1:
            raise ValueError(f"sigmas must decrease strictly within [0, 1]; got {sigmas.tolist()}. "
                             "Build them with flow_sigmas(steps, shift, denoise).")
        self.sigmas = sigmas
        self._values = sigmas.tolist()  # python floats: scalar coefficients stay in float64
        self._next_index = 0

    @property
    def num_steps(self):
        return len(self._values) - 1

    @property
    def timesteps(self):
        """[steps] float64 model timesteps, sigma * 1000."""
        return self.sigmas[:-1] * NUM_TRAIN_TIMESTEPS

    def to(self, device):
        """Move the history of earlier steps (multistep solvers' x0 predictions, states) to `device`:
        the latents of a two-expert run hop to the active expert's GPU mid-run. -> self"""
        for name, value in vars(self).items():
            if name == "sigmas":  # the schedule stays on the CPU, in float64
                continue
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
            elif isinstance(value, list) and value and all(isinstance(v, torch.Tensor) for v in value):
                setattr(self, name, [v.to(device) for v in value])
        return self

    def _check_index(self, step_index):
        if step_index != self._next_index or not 0 <= step_index < self.num_steps:
            raise ValueError(f"{type(self).__name__}.step got step_index={step_index}; expected "
                             f"{self._next_index} of {self.num_steps} steps. Steps run once each, in order; "
                             "make a new scheduler for a new generation.")
        self._next_index += 1

    def step(self, velocity, x, step_index):
        raise NotImplementedError


class FlowEulerScheduler(FlowScheduler):
    """First-order: x_next = x + (sigma_next - sigma) * v (diffusers' FlowMatchEulerDiscreteScheduler)."""

    def step(self, velocity, x, step_index):
        self._check_index(step_index)
        return x + (self._values[step_index + 1] - self._values[step_index]) * velocity


class _DataPredictionMultistep(FlowScheduler):
    """Shared parts of solvers that work on x0 predictions in log-SNR time (alpha = 1 - sigma)."""

    def __init__(self, sigmas):
        super().__init__(sigmas)
        if self._values[0] > 1 - SIGMA_ONE_EPS:  # log-SNR is -inf at sigma = 1; nudge as diffusers does
            self._values[0] = 1 - SIGMA_ONE_EPS
        self._lambdas = [_log_snr(s) for s in self._values]
        self._x0_history = []  # newest last

    def _remember(self, x0, keep):
        self._x0_history = (self._x0_history + [x0])[-keep:]

    def _first_order(self, x, x0, i):
        """The exact step for a constant x0 prediction (DDIM; equals Euler for flow): from sigma_i to sigma_i+1."""
        sigma, sigma_next = self._values[i], self._values[i + 1]
        if sigma_next == 0:
            return x0
        h = self._lambdas[i + 1] - self._lambdas[i]
        return (sigma_next / sigma) * x - ((1 - sigma_next) * math.expm1(-h)) * x0


class FlowUniPCScheduler(_DataPredictionMultistep):
    """UniPC multistep (Zhao et al. 2023) with x0 prediction on flow sigmas: a UniP predictor of
    `order` and a UniC corrector, variant B(h) = expm1(-h) ('bh2') or -h ('bh1').

    Matches Wan 2.1's FlowUniPCMultistepScheduler and diffusers' UniPCMultistepScheduler(
    use_flow_sigmas=True, prediction_type='flow_prediction', solver_order=order) given the same sigmas:
    the order warms up over the first steps and drops to what is left at the last ones
    (lower_order_final); the corrector runs on every step after the first, and the velocity is always
    evaluated on the uncorrected state.
    """

    def __init__(self, sigmas, order=2, variant="bh2"):
        super().__init__(sigmas)
        if order not in (1, 2, 3):
            raise ValueError(f"UniPC order must be 1, 2 or 3; got {order!r}.")
        if variant not in ("bh1", "bh2"):
            raise ValueError(f"UniPC variant must be 'bh1' or 'bh2'; got {variant!r}.")
        self.order, self.variant = order, variant
        self._previous_x = None     # the (corrected) state the last predictor started from
        self._previous_order = 0

    def _coefficients(self, h, rks):
        """Rows R [p, p] (powers of rks, rks ending with 1), right side b [p] and B(h), for step size h."""
        hh = -h
        b_h = math.expm1(hh) if self.variant == "bh2" else hh
        phi = math.expm1(hh) / hh - 1
        factorial, rows, rhs = 1, [], []
        for k in range(1, len(rks) + 1):
            rows.append([r ** (k - 1) for r in rks])
            rhs.append(phi * factorial / b_h)
            factorial *= k + 1
            phi = phi / hh - 1 / factorial
        return torch.tensor(rows, dtype=torch.float64), torch.tensor(rhs, dtype=torch.float64), b_h

    def _differences(self, base_index, history, order, h):
        """Scaled differences of older x0 predictions against history[-1], and their ratios rk."""
        rks, diffs = [], []
        for k in range(1, order):
            rk = (self._lambdas[base_index - k] - self._lambdas[base_index]) / h
            rks.append(rk)
            diffs.append((history[-1 - k] - history[-1]) / rk)
        return rks, diffs

    def _predict(self, x, i, order):
        """UniP: x at sigma_i -> x at sigma_i+1, from the last `order` x0 predictions."""
        history = self._x0_history
        x_next = self._first_order(x, history[-1], i)
        if order == 1 or self._values[i + 1] == 0:
            return x_next
        h = self._lambdas[i + 1] - self._lambdas[i]
        rks, diffs = self._differences(i, history, order, h)
        rows, rhs, b_h = self._coefficients(h, rks + [1.0])
        rhos = [0.5] if order == 2 else torch.linalg.solve(rows[:-1, :-1], rhs[:-1]).tolist()
        correction = sum(rho * d for rho, d in zip(rhos, diffs))
        return x_next - ((1 - self._values[i + 1]) * b_h) * correction

    def _correct(self, x0_now, i, order):
        """UniC: redo the step sigma_i-1 -> sigma_i with the new x0 prediction at sigma_i."""
        history = self._x0_history  # x0 predictions up to step i - 1
        h = self._lambdas[i] - self._lambdas[i - 1]
        rks, diffs = self._differences(i - 1, history, order, h)
        rows, rhs, b_h = self._coefficients(h, rks + [1.0])
        rhos = [0.5] if order == 1 else torch.linalg.solve(rows, rhs).tolist()
        correction = sum(rho * d for rho, d in zip(rhos[:-1], diffs)) + rhos[-1] * (x0_now - history[-1])
        return self._first_order(self._previous_x, history[-1], i - 1) - ((1 - self._values[i]) * b_h) * correction

    def step(self, velocity, x, step_index):
        self._check_index(step_index)
        i = step_index
        x0 = x - self._values[i] * velocity
        if i > 0:
            x = self._correct(x0, i, self._previous_order)
        self._remember(x0, keep=self.order)
        order = min(self.order, len(self._x0_history), self.num_steps - i)
        self._previous_x, self._previous_order = x, order
        return self._predict(x, i, order)


class FlowDPMPP2MScheduler(_DataPredictionMultistep):
    """DPM-Solver++(2M), midpoint form, on flow sigmas: first order at the first and the last step.

    Matches diffusers' DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type=
    'flow_prediction', algorithm_type='dpmsolver++', solver_order=2) given the same sigmas.
    """

    def step(self, velocity, x, step_index):
        self._check_index(step_index)
        i = step_index
        x0 = x - self._values[i] * velocity
        self._remember(x0, keep=2)
        x_next = self._first_order(x, x0, i)
        if i == 0 or i == self.num_steps - 1 or self._values[i + 1] == 0:
            return x_next
        h = self._lambdas[i + 1] - self._lambdas[i]
        r = (self._lambdas[i] - self._lambdas[i - 1]) / h
        d1 = (x0 - self._x0_history[-2]) / r
        return x_next - (0.5 * (1 - self._values[i + 1]) * math.expm1(-h)) * d1


SCHEDULERS = {"euler": FlowEulerScheduler, "unipc": FlowUniPCScheduler, "dpm++": FlowDPMPP2MScheduler}


def make_scheduler(name, sigmas):
    """A fresh solver of the registered `name` over `sigmas`."""
    if name not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {name!r}; choose one of {', '.join(map(repr, SCHEDULERS))}.")
    return SCHEDULERS[name](sigmas)
