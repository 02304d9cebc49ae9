"""Float64 NumPy references for the optimizer tests: a small MLP (Dense-Tanh-Dense with softmax
cross-entropy) with its analytic gradient, and torch.optim's single-tensor algorithms written
out independently (SGD, Adam/AdamW, RMSprop, Adagrad, Adadelta, NAdam, LBFGS with strong Wolfe).
Parameters are dicts of float64 arrays keyed by mpscy's names."""
import math

import numpy as np

import mpscy
from mpscy import layers, optim

N_IN, N_HID, N_OUT = 64, 16, 10


def mlp():
    return mpscy.Sequential([layers.Dense(N_HID), layers.Tanh(), layers.Dense(N_OUT)], input_shape=(N_IN,))


def digits_batches(batch, count):
    x, y = mpscy.datasets.load_digits()
    n = len(x) // batch
    return [(x[(i % n) * batch:(i % n + 1) * batch], y[(i % n) * batch:(i % n + 1) * batch]) for i in range(count)]


def loss_and_grad(p, x, y, weight_decay=0.0):
    """Mean softmax cross-entropy of the MLP (+ weight_decay/2 |p|^2) and its gradient, float64."""
    x = x.astype(np.float64)
    z1 = x @ p["dense_0.weight"].T + p["dense_0.bias"]
    h = np.tanh(z1)
    z2 = h @ p["dense_2.weight"].T + p["dense_2.bias"]
    z2 = z2 - z2.max(axis=1, keepdims=True)
    logp = z2 - np.log(np.exp(z2).sum(axis=1, keepdims=True))
    b = len(x)
    loss = -logp[np.arange(b), y].mean()
    dz2 = np.exp(logp)
    dz2[np.arange(b), y] -= 1.0
    dz2 /= b
    dh = dz2 @ p["dense_2.weight"]
    dz1 = dh * (1.0 - h * h)
    g = {"dense_0.weight": dz1.T @ x, "dense_0.bias": dz1.sum(0),
         "dense_2.weight": dz2.T @ h, "dense_2.bias": dz2.sum(0)}
    if weight_decay:
        loss += 0.5 * weight_decay * sum(float((v * v).sum()) for v in p.values())
        g = {k: g[k] + weight_decay * p[k] for k in g}
    return loss, g


# ------------------------------------------------------------------ first-order optimizers

class RefOptimizer:
    """torch.optim's per-tensor update, applied to each parameter independently."""

    def __init__(self, **hp):
        self.hp = hp
        self.state = {}
        self.t = 0

    def step(self, p, g):
        self.t += 1
        for k in p:
            self.update(k, p, g[k].copy(), self.state.setdefault(k, {}))


def _coupled(h, k, p, g):
    """The gradient as SGD, RMSprop, Adagrad and Adadelta use it: negated when maximizing, then
    weight decay added to it (coupled, L2)."""
    if h.get("maximize"):
        g = -g
    if h.get("weight_decay", 0):
        g = g + h["weight_decay"] * p[k]
    return g


class RefSGD(RefOptimizer):
    def update(self, k, p, g, s):
        h = self.hp
        g = _coupled(h, k, p, g)
        mom = h.get("momentum", 0)
        if mom:
            if "buf" not in s:
                s["buf"] = g.copy()
            else:
                s["buf"] = mom * s["buf"] + (1 - h.get("dampening", 0)) * g
            g = g + mom * s["buf"] if h.get("nesterov") else s["buf"]
        p[k] = p[k] - h["lr"] * g


def _adam_moments(h, k, p, g, s, decoupled_key):
    """The first half of Adam, AdamW and NAdam: maximize, weight decay (decoupled when
    h[decoupled_key], applied to p[k] then), and the moment updates m, v in s. Returns (g, m, v)."""
    b1, b2 = h.get("betas", (0.9, 0.999))
    if h.get("maximize"):
        g = -g
    wd = h.get("weight_decay", 0)
    if wd:
        if h.get(decoupled_key):
            p[k] = p[k] * (1 - h["lr"] * wd)
        else:
            g = g + wd * p[k]
    m = s.setdefault("m", np.zeros_like(g))
    v = s.setdefault("v", np.zeros_like(g))
    m += (1 - b1) * (g - m)
    v *= b2
    v += (1 - b2) * g * g
    return g, m, v


class RefAdam(RefOptimizer):
    def update(self, k, p, g, s):
        h = self.hp
        g, m, v = _adam_moments(h, k, p, g, s, "decoupled")
        b1, b2 = h.get("betas", (0.9, 0.999))
        vv = v
        if h.get("amsgrad"):
            s["vmax"] = np.maximum(s.get("vmax", np.zeros_like(g)), v)
            vv = s["vmax"]
        t = self.t
        denom = np.sqrt(vv) / math.sqrt(1 - b2 ** t) + h.get("eps", 1e-8)
        p[k] = p[k] - h["lr"] / (1 - b1 ** t) * m / denom


class RefRMSprop(RefOptimizer):
    def update(self, k, p, g, s):
        h = self.hp
        a = h.get("alpha", 0.99)
        g = _coupled(h, k, p, g)
        sq = s.setdefault("sq", np.zeros_like(g))
        sq *= a
        sq += (1 - a) * g * g
        if h.get("centered"):
            ga = s.setdefault("ga", np.zeros_like(g))
            ga += (1 - a) * (g - ga)
            avg = np.sqrt(sq - ga * ga)
        else:
            avg = np.sqrt(sq)
        avg = avg + h.get("eps", 1e-8)
        if h.get("momentum", 0) > 0:
            buf = s.setdefault("buf", np.zeros_like(g))
            buf *= h["momentum"]
            buf += g / avg
            p[k] = p[k] - h["lr"] * buf
        else:
            p[k] = p[k] - h["lr"] * g / avg


class RefAdagrad(RefOptimizer):
    def update(self, k, p, g, s):
        h = self.hp
        g = _coupled(h, k, p, g)
        clr = h["lr"] / (1 + (self.t - 1) * h.get("lr_decay", 0))
        acc = s.setdefault("sum", np.full_like(g, h.get("initial_accumulator_value", 0.0)))
        acc += g * g
        p[k] = p[k] - clr * g / (np.sqrt(acc) + h.get("eps", 1e-10))


class RefAdadelta(RefOptimizer):
    def update(self, k, p, g, s):
        h = self.hp
        rho, eps = h.get("rho", 0.9), h.get("eps", 1e-6)
        g = _coupled(h, k, p, g)
        sq = s.setdefault("sq", np.zeros_like(g))
        acc = s.setdefault("acc", np.zeros_like(g))
        sq *= rho
        sq += (1 - rho) * g * g
        delta = np.sqrt(acc + eps) / np.sqrt(sq + eps) * g
        acc *= rho
        acc += (1 - rho) * delta * delta
        p[k] = p[k] - h["lr"] * delta


class RefNAdam(RefOptimizer):
    def step(self, p, g):
        h = self.hp
        b1 = h.get("betas", (0.9, 0.999))[0]
        md = h.get("momentum_decay", 4e-3)
        t = self.t + 1
        self.mu = b1 * (1 - 0.5 * 0.96 ** (t * md))
        self.mu_next = b1 * (1 - 0.5 * 0.96 ** ((t + 1) * md))
        self.prod = getattr(self, "prod", 1.0) * self.mu
        super().step(p, g)

    def update(self, k, p, g, s):
        h = self.hp
        g, m, v = _adam_moments(h, k, p, g, s, "decoupled_weight_decay")
        b2 = h.get("betas", (0.9, 0.999))[1]
        denom = np.sqrt(v / (1 - b2 ** self.t)) + h.get("eps", 1e-8)
        p[k] = p[k] - h["lr"] * (1 - self.mu) / (1 - self.prod) * g / denom
        p[k] = p[k] - h["lr"] * self.mu_next / (1 - self.prod * self.mu_next) * m / denom


# (mpscy optimizer, reference, torch class name, torch kwargs) with every option away from its default
CASES = {
    "sgd_dampening": (optim.SGD(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=1e-2),
                      RefSGD(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=1e-2),
                      "SGD", dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=1e-2)),
    "sgd_nesterov_maximize": (optim.SGD(lr=0.02, momentum=0.9, nesterov=True, weight_decay=1e-3, maximize=True),
                              RefSGD(lr=0.02, momentum=0.9, nesterov=True, weight_decay=1e-3, maximize=True),
                              "SGD", dict(lr=0.02, momentum=0.9, nesterov=True, weight_decay=1e-3, maximize=True)),
    "adam_amsgrad_maximize": (optim.Adam(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2, amsgrad=True, maximize=True),
                              RefAdam(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2, amsgrad=True, maximize=True),
                              "Adam", dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2, amsgrad=True, maximize=True)),
    "adam_decoupled": (optim.Adam(lr=3e-3, betas=(0.85, 0.995), eps=1e-7, weight_decay=0.1, decoupled_weight_decay=True),
                       RefAdam(lr=3e-3, betas=(0.85, 0.995), eps=1e-7, weight_decay=0.1, decoupled=True),
                       "Adam", dict(lr=3e-3, betas=(0.85, 0.995), eps=1e-7, weight_decay=0.1, decoupled_weight_decay=True)),
    "adamw_amsgrad": (optim.AdamW(lr=3e-3, betas=(0.85, 0.995), eps=1e-7, weight_decay=0.05, amsgrad=True, maximize=True),
                      RefAdam(lr=3e-3, betas=(0.85, 0.995), eps=1e-7, weight_decay=0.05, amsgrad=True, maximize=True, decoupled=True),
                      "AdamW", dict(lr=3e-3, betas=(0.85, 0.995), eps=1e-7, weight_decay=0.05, amsgrad=True, maximize=True)),
    "rmsprop_centered_momentum": (optim.RMSprop(lr=1e-3, alpha=0.9, eps=1e-6, weight_decay=1e-2, momentum=0.5, centered=True, maximize=True),
                                  RefRMSprop(lr=1e-3, alpha=0.9, eps=1e-6, weight_decay=1e-2, momentum=0.5, centered=True, maximize=True),
                                  "RMSprop", dict(lr=1e-3, alpha=0.9, eps=1e-6, weight_decay=1e-2, momentum=0.5, centered=True, maximize=True)),
    "rmsprop_plain": (optim.RMSprop(lr=2e-3, alpha=0.95, eps=1e-7, weight_decay=1e-3),
                      RefRMSprop(lr=2e-3, alpha=0.95, eps=1e-7, weight_decay=1e-3),
                      "RMSprop", dict(lr=2e-3, alpha=0.95, eps=1e-7, weight_decay=1e-3)),
    "adagrad": (optim.Adagrad(lr=0.05, lr_decay=0.01, weight_decay=1e-2, initial_accumulator_value=0.1, eps=1e-8, maximize=True),
                RefAdagrad(lr=0.05, lr_decay=0.01, weight_decay=1e-2, initial_accumulator_value=0.1, eps=1e-8, maximize=True),
                "Adagrad", dict(lr=0.05, lr_decay=0.01, weight_decay=1e-2, initial_accumulator_value=0.1, eps=1e-8, maximize=True)),
    "adadelta": (optim.Adadelta(lr=0.5, rho=0.8, eps=1e-5, weight_decay=1e-2, maximize=True),
                 RefAdadelta(lr=0.5, rho=0.8, eps=1e-5, weight_decay=1e-2, maximize=True),
                 "Adadelta", dict(lr=0.5, rho=0.8, eps=1e-5, weight_decay=1e-2, maximize=True)),
    "nadam": (optim.NAdam(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2, momentum_decay=0.01, maximize=True),
              RefNAdam(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2, momentum_decay=0.01, maximize=True),
              "NAdam", dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2, momentum_decay=0.01, maximize=True)),
    # beta2, alpha, rho near 1, where 1 - beta2 must be taken in double as torch does (1.0f -
    # beta2 from the rounded beta2 was 1e-4 off at 0.9999: 4e-5 to 3.5e-4 after 30 steps)
    "adam_beta2_near_one": (optim.Adam(lr=3e-3, betas=(0.9, 0.99999)), RefAdam(lr=3e-3, betas=(0.9, 0.99999)),
                            "Adam", dict(lr=3e-3, betas=(0.9, 0.99999))),
    "nadam_beta2_near_one": (optim.NAdam(lr=3e-3, betas=(0.9, 0.9999)), RefNAdam(lr=3e-3, betas=(0.9, 0.9999)),
                             "NAdam", dict(lr=3e-3, betas=(0.9, 0.9999))),
    "rmsprop_alpha_near_one": (optim.RMSprop(lr=1e-3, alpha=0.9999, centered=True),
                               RefRMSprop(lr=1e-3, alpha=0.9999, centered=True),
                               "RMSprop", dict(lr=1e-3, alpha=0.9999, centered=True)),
    "adadelta_rho_near_one": (optim.Adadelta(lr=1.0, rho=0.9999), RefAdadelta(lr=1.0, rho=0.9999),
                              "Adadelta", dict(lr=1.0, rho=0.9999)),
    "nadam_decoupled": (optim.NAdam(lr=3e-3, betas=(0.85, 0.995), eps=1e-7, weight_decay=0.05, momentum_decay=0.02, decoupled_weight_decay=True),
                        RefNAdam(lr=3e-3, betas=(0.85, 0.995), eps=1e-7, weight_decay=0.05, momentum_decay=0.02, decoupled_weight_decay=True),
                        "NAdam", dict(lr=3e-3, betas=(0.85, 0.995), eps=1e-7, weight_decay=0.05, momentum_decay=0.02, decoupled_weight_decay=True)),
}


def max_rel_err(a, b):
    """Largest per-tensor max|a - b| / max|b| over the parameters."""
    return max(float(np.abs(a[k] - b[k]).max() / np.abs(b[k]).max()) for k in b)


# ------------------------------------------------------------------ L-BFGS (torch.optim.LBFGS)

def _cubic(x1, f1, g1, x2, f2, g2, bounds=None):
    lo, hi = bounds if bounds is not None else ((x1, x2) if x1 <= x2 else (x2, x1))
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    d2s = d1 ** 2 - g1 * g2
    if d2s >= 0:
        d2 = math.sqrt(d2s)
        if x1 <= x2:
            mp = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
        else:
            mp = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
        return min(max(mp, lo), hi)
    return (lo + hi) / 2.0


def _strong_wolfe(obj, x, t, d, f, g, gtd, c1=1e-4, c2=0.9, tol=1e-9, max_ls=25):
    d_norm = np.abs(d).max()
    f_new, g_new = obj(x, t, d)
    evals = 1
    gtd_new = g_new @ d
    t_prev, f_prev, g_prev, gtd_prev = 0, f, g, gtd
    done = False
    it = 0
    while it < max_ls:
        if f_new > (f + c1 * t * gtd) or (it > 1 and f_new >= f_prev):
            br, bf, bg, bd = [t_prev, t], [f_prev, f_new], [g_prev, g_new], [gtd_prev, gtd_new]
            break
        if abs(gtd_new) <= -c2 * gtd:
            br, bf, bg = [t], [f_new], [g_new]
            done = True
            break
        if gtd_new >= 0:
            br, bf, bg, bd = [t_prev, t], [f_prev, f_new], [g_prev, g_new], [gtd_prev, gtd_new]
            break
        tmp = t
        t = _cubic(t_prev, f_prev, gtd_prev, t, f_new, gtd_new, bounds=(t + 0.01 * (t - t_prev), t * 10))
        t_prev, f_prev, g_prev, gtd_prev = tmp, f_new, g_new, gtd_new
        f_new, g_new = obj(x, t, d)
        evals += 1
        gtd_new = g_new @ d
        it += 1
    if it == max_ls:
        br, bf, bg = [0, t], [f, f_new], [g, g_new]
    insuf = False
    lo, hi = (0, 1) if bf[0] <= bf[-1] else (1, 0)
    while not done and it < max_ls:
        if abs(br[1] - br[0]) * d_norm < tol:
            break
        t = _cubic(br[0], bf[0], bd[0], br[1], bf[1], bd[1])
        eps = 0.1 * (max(br) - min(br))
        if min(max(br) - t, t - min(br)) < eps:
            if insuf or t >= max(br) or t <= min(br):
                t = max(br) - eps if abs(t - max(br)) < abs(t - min(br)) else min(br) + eps
                insuf = False
            else:
                insuf = True
        else:
            insuf = False
        f_new, g_new = obj(x, t, d)
        evals += 1
        gtd_new = g_new @ d
        it += 1
        if f_new > (f + c1 * t * gtd) or f_new >= bf[lo]:
            br[hi], bf[hi], bg[hi], bd[hi] = t, f_new, g_new, gtd_new
            lo, hi = (0, 1) if bf[0] <= bf[1] else (1, 0)
        else:
            if abs(gtd_new) <= -c2 * gtd:
                done = True
            elif gtd_new * (br[hi] - br[lo]) >= 0:
                br[hi], bf[hi], bg[hi], bd[hi] = br[lo], bf[lo], bg[lo], bd[lo]
            br[lo], bf[lo], bg[lo], bd[lo] = t, f_new, g_new, gtd_new
    return bf[lo], bg[lo], br[lo], evals


class RefLBFGS:
    """torch.optim.LBFGS.step over a flat float64 vector; fg(x) -> (loss, gradient)."""

    def __init__(self, lr=1.0, max_iter=20, max_eval=None, tolerance_grad=1e-7, tolerance_change=1e-9,
                 history_size=100, line_search_fn=None):
        self.lr, self.max_iter = lr, max_iter
        self.max_eval = max_eval if max_eval is not None else max_iter * 5 // 4
        self.tol_grad, self.tol_change, self.history_size = tolerance_grad, tolerance_change, history_size
        self.ls = line_search_fn
        self.s = {"func_evals": 0, "n_iter": 0}

    def step(self, x, fg):
        st = self.s
        loss, g = fg(x)
        orig = loss
        evals = 1
        st["func_evals"] += 1
        if np.abs(g).max() <= self.tol_grad:
            return x, orig
        d, t = st.get("d"), st.get("t")
        dirs, stps, ro, H = st.get("old_dirs"), st.get("old_stps"), st.get("ro"), st.get("H_diag")
        pg, prev_loss = st.get("prev_flat_grad"), st.get("prev_loss")
        n = 0
        while n < self.max_iter:
            n += 1
            st["n_iter"] += 1
            if st["n_iter"] == 1:
                d = -g
                dirs, stps, ro, H = [], [], [], 1
            else:
                y, s = g - pg, d * t
                ys = y @ s
                if ys > 1e-10:
                    if len(dirs) == self.history_size:
                        dirs.pop(0), stps.pop(0), ro.pop(0)
                    dirs.append(y), stps.append(s), ro.append(1.0 / ys)
                    H = ys / (y @ y)
                al = [0.0] * len(dirs)
                q = -g
                for i in range(len(dirs) - 1, -1, -1):
                    al[i] = (stps[i] @ q) * ro[i]
                    q = q - al[i] * dirs[i]
                d = r = q * H
                for i in range(len(dirs)):
                    be = (dirs[i] @ r) * ro[i]
                    r = r + (al[i] - be) * stps[i]
                d = r
            pg = g.copy()
            prev_loss = loss
            t = min(1.0, 1.0 / np.abs(g).sum()) * self.lr if st["n_iter"] == 1 else self.lr
            gtd = g @ d
            if gtd > -self.tol_change:
                break
            if self.ls is not None:
                def obj(x0, tt, dd):
                    return fg(x0 + tt * dd)
                loss, g, t, ls_evals = _strong_wolfe(obj, x, t, d, loss, g, gtd, tol=self.tol_change,
                                                     max_ls=self.max_eval - evals)
                x = x + t * d
                opt = np.abs(g).max() <= self.tol_grad
            else:
                x = x + t * d
                ls_evals = 0
                opt = False
                if n != self.max_iter:
                    loss, g = fg(x)
                    opt = np.abs(g).max() <= self.tol_grad
                    ls_evals = 1
            evals += ls_evals
            st["func_evals"] += ls_evals
            if n == self.max_iter or evals >= self.max_eval or opt:
                break
            if np.abs(d * t).max() <= self.tol_change:
                break
            if abs(loss - prev_loss) < self.tol_change:
                break
        st.update(d=d, t=t, old_dirs=dirs, old_stps=stps, ro=ro, H_diag=H, prev_flat_grad=pg, prev_loss=prev_loss)
        return x, orig
