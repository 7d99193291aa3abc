"""UniPC multistep (B(h) variant, data prediction) on flow-matching sigmas, one trajectory per frame.

The solver SkyReels-V2's diffusion forcing pipelines use: diffusers' `UniPCMultistepScheduler` with
`use_flow_sigmas`, `prediction_type="flow_prediction"`, order 2, deep-copied once per latent frame and
stepped only where the update mask is set (Zhao et al., "UniPC", arXiv 2302.04867). Here the
per-frame state (the last converted model outputs, the sample before the last predictor, the warm-up
counter) lives in a small record keyed by absolute frame instead of a scheduler object per frame, and
the scalar coefficients of every (step, order) pair are computed once, in float32 exactly as that
scheduler computes them, so the trajectory matches the pipeline's to float rounding.

Flow sigmas: x_sigma = (1 - sigma) x0 + sigma eps, i.e. alpha = 1 - sigma; lambda = log(alpha / sigma).
A velocity v converts to the data prediction x0 = x - sigma v. Step k moves a frame from sigmas[k] to
sigmas[k+1]: the corrector (UniC) first refines x_k with the new x0, then the predictor (UniP)
extrapolates to sigmas[k+1].

`pipeline_compat` (default on) reproduces a quirk both reference pipelines share: they call
`latents[..., idx] = scheduler.step(v, t, latents[..., idx])`, and at a step where no corrector runs
(the first one) the scheduler keeps that *view* as its `last_sample`; the assignment then overwrites
it with the step's own result, so the next corrector starts from x_{k+1} instead of x_k. With the
flag off this is textbook UniPC (identical to stepping the scheduler on fresh tensors).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from scopevid.errors import ConfigError


@dataclass
class _FrameState:
    outputs: list = field(default_factory=list)  # converted x0 predictions, oldest first (<= order)
    last_sample: torch.Tensor | None = None  # x_k before the last predictor (after its corrector)
    warm: int = 0  # steps taken, capped at `order` (diffusers' lower_order_nums)
    order: int = 0  # order the last predictor used (the next corrector uses it)
    shadow: torch.Tensor | None = None  # float32 copy of the last returned sample (see `step`)


class UniPC:
    """Per-frame UniPC-p with UniC corrector over a fixed table of T+1 flow sigmas (last one 0)."""

    name = "unipc"

    def __init__(
        self,
        sigmas: Sequence[float],
        order: int = 2,
        solver_type: str = "bh2",
        lower_order_final: bool = True,
        disable_corrector: Sequence[int] = (),
        pipeline_compat: bool = True,
    ):
        if order < 1:
            raise ConfigError(f"solver_order: must be >= 1, got {order}")
        if solver_type not in ("bh1", "bh2"):
            raise ConfigError(f"solver_type: must be bh1 or bh2, got {solver_type!r}")
        if len(sigmas) < 2:
            raise ConfigError("unipc: needs at least one step (two sigmas)")
        sig = torch.tensor([float(s) for s in sigmas], dtype=torch.float32)
        if not bool((sig[:-1] > 0).all() and (sig[:-1] < 1).all()):
            # alpha = 1 - sigma must be > 0 for lambda; diffusers nudges sigma 1 down by 1e-6 the same way
            sig[:-1] = sig[:-1].clamp(max=1.0 - 1e-6)
        self.sigmas = sig  # float32, like the scheduler's table
        self.num_steps = len(sigmas) - 1
        self.order = order
        self.bh2 = solver_type == "bh2"
        self.lower_order_final = lower_order_final
        self.disable_corrector = frozenset(int(i) for i in disable_corrector)
        self.pipeline_compat = pipeline_compat
        # one scalar at a time, as the scheduler does (a vectorised log may round differently)
        self._lambda = [torch.log(1.0 - s) - torch.log(s) for s in self.sigmas]  # +inf at the final sigma 0
        self._coef: dict = {}
        self._state: dict[int, _FrameState] = {}

    @classmethod
    def for_adapter(cls, adapter, schedule) -> "UniPC":
        """Built on the video's noise levels (`adapter.prepare`) with the model's own scheduler options
        (`solver_options()`; UniPC's defaults for a model without a scheduler of its own)."""
        opts = dict(adapter.solver_options() or {})
        allowed = {"order", "solver_type", "lower_order_final", "disable_corrector", "pipeline_compat"}
        unknown = sorted(set(opts) - allowed)
        if unknown:
            raise ConfigError(f"solver: unipc does not support option(s) {unknown} of model {adapter.name}")
        return cls(schedule.sigmas, **opts)

    # --- coefficients (scalars, float32, as the scheduler computes them) -------------------------
    def _coefficients(self, kind: str, k: int, p: int) -> dict:
        """kind 'p': predictor at step k (sigmas[k] -> sigmas[k+1]) of order p, from outputs at
        k, k-1, ..; kind 'c': corrector of x_k at step k of order p, from outputs at k-1, k-2, .."""
        key = (kind, k, p)
        if key in self._coef:
            return self._coef[key]
        lam, sig = self._lambda, self.sigmas
        t, s0 = (k + 1, k) if kind == "p" else (k, k - 1)
        h = lam[t] - lam[s0]
        rks = [(lam[s0 - i] - lam[s0]) / h for i in range(1, p)]  # earlier outputs, relative to h
        hh = -h  # data prediction
        h_phi_1 = torch.expm1(hh)
        b_h = torch.expm1(hh) if self.bh2 else hh
        rk = torch.stack(rks + [torch.ones(())])
        R, b = [], []
        h_phi_k, fact = h_phi_1 / hh - 1, 1
        for i in range(1, p + 1):
            R.append(torch.pow(rk, i - 1))
            b.append(h_phi_k * fact / b_h)
            fact *= i + 1
            h_phi_k = h_phi_k / hh - 1 / fact
        R, b = torch.stack(R), torch.stack(b)
        if kind == "p":
            rhos = torch.full((1,), 0.5) if p == 2 else (torch.linalg.solve(R[:-1, :-1], b[:-1]) if p > 2 else torch.zeros(0))
        else:
            rhos = torch.full((1,), 0.5) if p == 1 else torch.linalg.solve(R, b)
        alpha_t = 1.0 - sig[t]
        c = {
            "x": sig[t] / sig[s0],  # x_t = x_scale * x - m0_scale * m0 - res_scale * residual
            "m0": alpha_t * h_phi_1,
            "res": alpha_t * b_h,
            "rks": rks,
            "rhos": rhos,
        }
        self._coef[key] = c
        return c

    @staticmethod
    def _differences(outputs: list, rks: list) -> list:
        m0 = outputs[-1]
        return [(outputs[-(i + 1)] - m0) / rk for i, rk in enumerate(rks, start=1)]

    def _predict(self, st: _FrameState, x: torch.Tensor, k: int, p: int) -> torch.Tensor:
        c = self._coefficients("p", k, p)
        x_t = c["x"] * x - c["m0"] * st.outputs[-1]
        if p >= 2:
            d = self._differences(st.outputs, c["rks"])
            res = sum(r * di for r, di in zip(c["rhos"].to(x.dtype), d))
            x_t = x_t - c["res"] * res
        return x_t

    def _correct(self, st: _FrameState, m_t: torch.Tensor, k: int, p: int) -> torch.Tensor:
        c = self._coefficients("c", k, p)
        x, m0 = st.last_sample, st.outputs[-1]
        x_t = c["x"] * x - c["m0"] * m0
        rhos = c["rhos"].to(x.dtype)
        res = rhos[-1] * (m_t - m0)
        if p >= 2:
            d = self._differences(st.outputs, c["rks"])
            res = sum(r * di for r, di in zip(rhos[:-1], d)) + res
        return x_t - c["res"] * res

    # --- the engine's solver interface -------------------------------------------------------
    def step(self, frame: int, x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float, step: int) -> torch.Tensor:
        """Advance `frame` from sigmas[step] to sigmas[step+1] given its velocity v ([C, H, W])."""
        k = int(step)
        if not 0 <= k < self.num_steps:
            raise ValueError(f"unipc: step {k} outside 0..{self.num_steps - 1}")
        if abs(float(sigma) - float(self.sigmas[k])) > 1e-4:
            raise ValueError(f"unipc: frame {frame} at step {k} has sigma {sigma}, the solver's table says {float(self.sigmas[k])}")
        st = self._state.setdefault(frame, _FrameState())
        if k > 0 and not st.outputs:
            raise ValueError(f"unipc: frame {frame} starts at step {k}; a multistep trajectory must start at step 0")
        # The engine may hold latents in bf16/fp16; the pipeline keeps them in float32. When the sample
        # handed back is our own last result rounded to the compute dtype, continue from the float32 copy.
        xs = x.float()
        if st.shadow is not None and x.dtype != torch.float32 and torch.equal(st.shadow.to(x.dtype), x):
            xs = st.shadow
        m = xs - self.sigmas[k] * v  # data prediction x0 (flow_prediction); sigma * v in v's dtype, as diffusers
        corrected = k > 0 and (k - 1) not in self.disable_corrector and st.last_sample is not None
        if corrected:
            xs = self._correct(st, m, k, st.order)
        st.outputs = (st.outputs + [m])[-self.order :]
        p = min(self.order, self.num_steps - k) if self.lower_order_final else self.order
        p = min(p, st.warm + 1)
        st.order = p
        st.last_sample = xs
        out = self._predict(st, xs, k, p)
        if self.pipeline_compat and not corrected:
            st.last_sample = out  # the pipelines' aliased view (see the module docstring)
        st.warm = min(st.warm + 1, self.order)
        if k == self.num_steps - 1:
            self.forget(frame)
        else:
            st.shadow = out
        return out.to(x.dtype)

    def forget(self, frame: int) -> None:
        self._state.pop(frame, None)

    def state_dict(self) -> dict:
        return {
            f: {"outputs": list(s.outputs), "last_sample": s.last_sample, "warm": s.warm, "order": s.order, "shadow": s.shadow}
            for f, s in self._state.items()
        }

    def load_state_dict(self, state: dict) -> None:
        self._state = {
            int(f): _FrameState(list(d["outputs"]), d["last_sample"], d["warm"], d["order"], d["shadow"]) for f, d in state.items()
        }
