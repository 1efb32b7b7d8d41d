"""The Chinchilla parametric loss L(N, D) = E + A / N^alpha + B / D^beta: its compute-optimal closed form and
a fit to (params, tokens, loss) points done the way Hoffmann et al. 2022 (Appendix D.2) describe it.

N counts every parameter of the model, embeddings included (tied weights once), as Hoffmann et al. did (Pearce
& Song 2024 show that dropping embeddings, as Kaplan et al. 2020 did, biases small-scale fits). Training compute
is the usual C = 6 N D.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os

import numpy as np

FIELDS = ("E", "A", "B", "alpha", "beta")
HUBER_DELTA = 1e-3  # Hoffmann et al.: Huber loss on log-loss with delta = 1e-3 (robust to outlying runs)
MIN_EXPONENT = 1e-4  # alpha, beta >= this: a law stays usable (flagged "degenerate") when N or D shows no effect


class ScalingError(ValueError):
    """Bad input for the scaling tools; the message is printed as one line (exit status 2)."""


@dataclasses.dataclass(frozen=True)
class ScalingLaw:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    source: str = ""

    def loss(self, n, d):
        """Predicted loss for N parameters trained on D tokens (numpy-broadcasting)."""
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        return self.E + self.A / n ** self.alpha + self.B / d ** self.beta

    @property
    def g(self) -> float:
        """G = (alpha A / (beta B))^(1 / (alpha + beta)): N_opt = G (C/6)^a, D_opt = (C/6)^b / G."""
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    def optimum(self, flops: float) -> tuple[float, float]:
        """Closed-form compute-optimal (N, D) for a budget of C = 6 N D FLOPs: minimise L(N, C / 6N) over N
        (setting dL/dN = 0 gives alpha A / N^alpha = beta B / D^beta)."""
        s = self.alpha + self.beta
        n = self.g * (flops / 6.0) ** (self.beta / s)
        return n, flops / (6.0 * n)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Hoffmann et al. 2022's parametric fit as re-estimated from their own data by Besiroglu, Erdil, Barnett & You,
# "Chinchilla Scaling: A replication attempt" (arXiv:2404.10102, 2024), Table 1. At Chinchilla's budget of 5.76e23
# FLOPs its optimum is ~72B parameters on ~1.33T tokens (Chinchilla itself: 70B on 1.4T).
BESIROGLU_2024 = ScalingLaw(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658,
                            source="Besiroglu et al. 2024, Chinchilla Scaling: A replication attempt "
                                   "(arXiv:2404.10102)")


def read_points(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """params, tokens, loss columns of a CSV (other columns ignored); every value must be a positive number."""
    if not os.path.isfile(path):
        raise ScalingError(f"{path}: no such file")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in ("params", "tokens", "loss") if c not in header]
        if missing:
            raise ScalingError(f"{path}: missing column(s) {', '.join(missing)} (need params,tokens,loss; "
                               f"found {','.join(header) or 'no header'})")
        rows = []
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): v for k, v in row.items() if k is not None}
            values = []
            for col in ("params", "tokens", "loss"):
                text = (row.get(col) or "").strip()
                try:
                    v = float(text)
                except ValueError:
                    raise ScalingError(f"{path} line {line}: {col} {text!r} is not a number") from None
                if not math.isfinite(v) or v <= 0:
                    raise ScalingError(f"{path} line {line}: {col} must be a positive number, got {text}")
                values.append(v)
            rows.append(values)
    if len(rows) < len(FIELDS):
        raise ScalingError(f"{path}: {len(rows)} point(s), but fitting E, A, B, alpha, beta needs at least "
                           f"{len(FIELDS)}")
    arr = np.array(rows, dtype=float)
    return arr[:, 0], arr[:, 1], arr[:, 2]


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss and its derivative."""
    a = np.abs(r)
    quad = a <= delta
    return np.where(quad, 0.5 * r * r, delta * (a - 0.5 * delta)), np.where(quad, r, delta * np.sign(r))


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float):
    """Sum of Huber(LSE(a - alpha log N, b - beta log D, e) - log L) and its gradient; theta = (a, b, e, alpha,
    beta) with A = exp(a), B = exp(b), E = exp(e) (Hoffmann et al. 2022, eq. 10)."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    top = terms.max(axis=0)
    w = np.exp(terms - top)
    total = w.sum(axis=0)
    lse = top + np.log(total)
    w /= total
    h, dh = _huber(lse - log_l, delta)
    grad = np.array([(dh * w[0]).sum(), (dh * w[1]).sum(), (dh * w[2]).sum(),
                     -(dh * w[0] * log_n).sum(), -(dh * w[1] * log_d).sum()])
    return h.sum(), grad


def _grid_objective(grid: np.ndarray, log_n, log_d, log_l, delta) -> np.ndarray:
    """Objective at every grid row at once (vectorised), to rank the starting points."""
    a, b, e, alpha, beta = (grid[:, i:i + 1] for i in range(5))
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, (len(grid), len(log_n)))])
    lse = np.logaddexp(np.logaddexp(terms[0], terms[1]), terms[2])
    return _huber(lse - log_l, delta)[0].sum(axis=1)


def fit(params, tokens, loss, delta: float = HUBER_DELTA, starts: int = 24) -> tuple[ScalingLaw, dict]:
    """Fit E, A, B, alpha, beta: Huber loss on log-loss, minimised with L-BFGS from the best ``starts`` points of
    Hoffmann et al.'s initialisation grid (alpha, beta in 0..2 by 0.5, e in -1..1 by 0.5, a, b in 0..25 by 5;
    the whole grid is scored at once, then the most promising starts are refined until three more agree with
    the best minimum). Returns the law and stats."""
    from scipy.optimize import minimize
    log_n, log_d, log_l = np.log(params), np.log(tokens), np.log(loss)
    axes = [np.arange(0, 30, 5.0), np.arange(0, 30, 5.0), np.arange(-1, 1.5, 0.5),
            np.arange(0, 2.5, 0.5), np.arange(0, 2.5, 0.5)]
    grid = np.array(np.meshgrid(*axes, indexing="ij")).reshape(5, -1).T
    grid[:, 3:] = np.maximum(grid[:, 3:], MIN_EXPONENT)  # exponent starts inside the bounds
    order = np.argsort(_grid_objective(grid, log_n, log_d, log_l, delta), kind="stable")[:starts]
    best, agree = None, 0
    for theta0 in grid[order]:
        res = minimize(_objective, theta0, args=(log_n, log_d, log_l, delta), jac=True, method="L-BFGS-B",
                       bounds=[(-30, 60), (-30, 60), (-5, 5), (MIN_EXPONENT, 5), (MIN_EXPONENT, 5)],
                       options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-12})
        same = best is not None and (abs(res.fun - best.fun) <= 1e-9 * abs(best.fun) + 1e-14
                                     or float(np.max(np.abs(res.x - best.x))) < 1e-4)
        if best is None or res.fun < best.fun:
            best, agree = res, agree if same else 0
        if same:
            agree += 1
            if agree >= 3:
                break  # three more starts found the same minimum: stop early (each start costs ~0.5 s)
    a, b, e, alpha, beta = (float(x) for x in best.x)
    law = ScalingLaw(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta,
                     source=f"fit to {len(log_n)} points (Huber delta {delta:g} on log-loss, L-BFGS)")
    pred = law.loss(params, tokens)
    stats = {"residual": float(best.fun), "rmse_loss": float(np.sqrt(np.mean((pred - loss) ** 2))),
             "max_rel_error": float(np.max(np.abs(pred / loss - 1))), "points": int(len(log_n)), "huber_delta": delta}
    # An exponent pinned near 0: the points show no effect of N (or D); plans from such a law mean little.
    stats["degenerate"] = [k for k, v in (("alpha", alpha), ("beta", beta)) if v < 10 * MIN_EXPONENT]
    return law, stats


def load_law(path: str | None) -> ScalingLaw:
    """A law from a JSON file written by ``fit --out`` (or any JSON with E, A, B, alpha, beta); None: the default."""
    if path is None:
        return BESIROGLU_2024
    try:
        with open(path) as f:
            raw = json.load(f)
    except OSError as e:
        raise ScalingError(f"{path}: cannot read the law ({e.strerror})") from None
    except ValueError as e:
        raise ScalingError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ScalingError(f"{path}: expected a JSON object with {', '.join(FIELDS)}")
    missing = [k for k in FIELDS if k not in raw]
    if missing:
        raise ScalingError(f"{path}: missing key(s) {', '.join(missing)}")
    for k in FIELDS:
        v = raw[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ScalingError(f"{path}: {k} must be a positive number, got {v!r}")
    return ScalingLaw(**{k: float(raw[k]) for k in FIELDS}, source=str(raw.get("source", path)))
