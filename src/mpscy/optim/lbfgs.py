"""The scalar half of torch.optim.LBFGS.step, line for line: iteration control, the strong-Wolfe
line search (bracketing and zoom with cubic interpolation) and the stopping tests. Every loss
evaluation is one native MPSCY_MODE_LBFGS call that also does the vector work due before it
(new direction, move along it); vectors never leave native memory. The gradients a line search
keeps (initial, previous, bracket ends) live in native registers named here by index. A step
that hits a non-finite loss is undone natively; any other interruption is rolled back here."""

import math

from ..errors import NonFiniteError

__all__ = ["LBFGSDriver"]

BEGIN, FINALIZE, DIRECTION, FIRST, MOVE, EVAL, COUNT, ROLLBACK = 1, 2, 4, 8, 16, 32, 64, 128
REGISTERS = 4


def _cubic_interpolate(x1, f1, g1, x2, f2, g2, bounds=None):
    """torch.optim.lbfgs._cubic_interpolate, in Python floats (IEEE division: inf/nan, no raise)."""
    if bounds is not None:
        xmin_bound, xmax_bound = bounds
    else:
        xmin_bound, xmax_bound = (x1, x2) if x1 <= x2 else (x2, x1)
    d1 = g1 + g2 - 3 * _div(f1 - f2, x1 - x2)
    d2_square = d1 ** 2 - g1 * g2
    if d2_square >= 0:
        d2 = math.sqrt(d2_square)
        if x1 <= x2:
            min_pos = x2 - (x2 - x1) * _div(g2 + d2 - d1, g2 - g1 + 2 * d2)
        else:
            min_pos = x1 - (x1 - x2) * _div(g1 + d2 - d1, g1 - g2 + 2 * d2)
        return min(max(min_pos, xmin_bound), xmax_bound)
    return (xmin_bound + xmax_bound) / 2.0


def _div(a, b):
    if b != 0:
        return a / b
    if a == 0 or a != a:
        return math.nan
    return math.copysign(math.inf, a) * math.copysign(1.0, b)


class _Point:
    """A point on the search line: step t, loss f, gradient register, g.d and max |g|."""

    __slots__ = ("t", "f", "reg", "gtd", "gmax")

    def __init__(self, t, f, reg, gtd, gmax):
        self.t, self.f, self.reg, self.gtd, self.gmax = t, f, reg, gtd, gmax


class LBFGSDriver:
    """Runs L-BFGS steps on a native graph (given per step, so the driver never keeps it
    alive). `state` holds the scalars torch keeps in LBFGS.state that the native side does
    not: func_evals, n_iter, t, prev_loss."""

    def __init__(self, optimizer):
        self.graph = None
        self.opt = optimizer
        self.state = {"func_evals": 0, "n_iter": 0, "t": 0.0, "prev_loss": None}
        self.calls = 0          # native calls of the last step (evaluations + moves)

    def step(self, graph, x, y):
        """One torch.optim.LBFGS.step on (x, y). Returns (orig_loss, correct, rows,
        grad_norm, applied). State changes only when the whole step succeeds."""
        g = graph
        g.acquire()             # the whole step: other threads get StateError meanwhile
        self.graph = g
        try:
            rows = g.stage(x, y)
            self.calls = 0
            self._begun = False
            try:
                return self._step(rows)
            except NonFiniteError:
                raise  # the native call already restored parameters and optimizer state
            except BaseException:
                if self._begun:     # only a step whose BEGIN call succeeded has something to undo
                    self._call(ROLLBACK, 0, 0, 0.0, 0.0)
                raise
        finally:
            self.graph = None
            g.release()

    def _call(self, ops, reg, flat, t_prev, t):
        self.calls += 1
        return self.graph.lbfgs_call(ops, reg, flat, t_prev, t)

    def _step(self, rows):
        o, g, st = self.opt, self.graph, dict(self.state)
        lr = g.lr
        tol_grad, tol_change = o.tolerance_grad, o.tolerance_change
        max_iter, max_eval = o.max_iter, o.max_eval

        loss, correct, grad_norm, _, _, _, _, _, gmax, gsum = self._call(BEGIN | EVAL, 0, 0, 0.0, 0.0)
        self._begun = True
        orig_loss = loss
        current_evals = 1
        st["func_evals"] += 1
        flat, flat_gmax = 0, gmax
        if flat_gmax <= tol_grad:
            self.state = st
            return orig_loss, correct, rows, grad_norm, False

        t = st["t"]
        prev_loss = st["prev_loss"]
        pending = False      # params still to be set to base + t * d (line search ended off its last point)
        moved = False
        n_iter = 0
        while n_iter < max_iter:
            n_iter += 1
            st["n_iter"] += 1
            first = st["n_iter"] == 1
            t_new = min(1.0, 1.0 / gsum) * lr if first else lr
            ops = DIRECTION | MOVE | (FIRST if first else 0) | (FINALIZE if pending else 0)
            ops |= 0 if moved else COUNT
            if o.line_search_fn is not None or n_iter != max_iter:
                ops |= EVAL
            reg = self._free(flat)
            prev_loss = loss
            r = self._call(ops, reg, flat, t, t_new)
            pending = False
            f_new, _, _, _, stopped, gtd, d_max, gtd_new, g_new_max, _ = r
            if stopped:          # gtd > -tolerance_change: torch breaks before moving
                t = t_new
                break
            moved = True
            if o.line_search_fn is not None:
                start = _Point(0.0, loss, flat, gtd, flat_gmax)
                loss, best, t, ls_evals = self._strong_wolfe(
                    start, d_max, _Point(t_new, f_new, reg, gtd_new, g_new_max),
                    max_ls=max_eval - current_evals)
                pending = best is not self._last    # params sit at the last point evaluated
                flat, flat_gmax = best.reg, best.gmax
                opt_cond = flat_gmax <= tol_grad
            else:
                t = t_new
                ls_evals = 0
                opt_cond = False
                if n_iter != max_iter:
                    loss, flat, flat_gmax = f_new, reg, g_new_max
                    opt_cond = flat_gmax <= tol_grad
                    ls_evals = 1
            current_evals += ls_evals
            st["func_evals"] += ls_evals
            if n_iter == max_iter or current_evals >= max_eval or opt_cond:
                break
            if d_max * abs(t) <= tol_change:
                break
            if abs(loss - prev_loss) < tol_change:
                break

        if pending:
            self._call(FINALIZE, 0, 0, t, 0.0)
        st["t"] = float(t)
        st["prev_loss"] = prev_loss
        self.state = st
        return orig_loss, correct, rows, grad_norm, moved

    @staticmethod
    def _free(*live):
        return next(r for r in range(REGISTERS) if r not in live)

    def _eval(self, t, *live):
        """Parameters to base + t * d, then one evaluation into a register not in `live`."""
        reg = self._free(*live)
        f, _, _, _, _, _, _, gtd, gmax, _ = self._call(MOVE | EVAL, reg, 0, 0.0, t)
        self._last = _Point(t, f, reg, gtd, gmax)
        return self._last

    def _strong_wolfe(self, start, d_norm, new, c1=1e-4, c2=0.9, max_ls=25):
        """torch.optim.lbfgs._strong_wolfe from `start` (t = 0: loss f, gradient g, g.d = gtd);
        `new` is the first trial, already evaluated. Returns (f, best point, t, evaluations)."""
        tol_change = self.opt.tolerance_change
        f, gtd = start.f, start.gtd
        self._last = new
        ls_func_evals = 1
        prev = start
        done = False
        ls_iter = 0
        bracket = None
        while ls_iter < max_ls:
            if new.f > (f + c1 * new.t * gtd) or (ls_iter > 1 and new.f >= prev.f):
                bracket = [prev, new]
                break
            if abs(new.gtd) <= -c2 * gtd:
                bracket = [new]
                done = True
                break
            if new.gtd >= 0:
                bracket = [prev, new]
                break
            min_step = new.t + 0.01 * (new.t - prev.t)
            max_step = new.t * 10
            t_next = _cubic_interpolate(prev.t, prev.f, prev.gtd, new.t, new.f, new.gtd,
                                        bounds=(min_step, max_step))
            prev = new
            new = self._eval(t_next, start.reg, prev.reg)
            ls_func_evals += 1
            ls_iter += 1
        if ls_iter == max_ls:
            bracket = [start, new]

        insuf_progress = False
        low, high = (0, 1) if bracket[0].f <= bracket[-1].f else (1, 0)
        while not done and ls_iter < max_ls:
            lo_t, hi_t = min(bracket[0].t, bracket[1].t), max(bracket[0].t, bracket[1].t)
            if abs(bracket[1].t - bracket[0].t) * d_norm < tol_change:
                break
            t_next = _cubic_interpolate(bracket[0].t, bracket[0].f, bracket[0].gtd,
                                        bracket[1].t, bracket[1].f, bracket[1].gtd)
            eps = 0.1 * (hi_t - lo_t)
            if min(hi_t - t_next, t_next - lo_t) < eps:
                if insuf_progress or t_next >= hi_t or t_next <= lo_t:
                    t_next = hi_t - eps if abs(t_next - hi_t) < abs(t_next - lo_t) else lo_t + eps
                    insuf_progress = False
                else:
                    insuf_progress = True
            else:
                insuf_progress = False
            new = self._eval(t_next, bracket[0].reg, bracket[1].reg)
            ls_func_evals += 1
            ls_iter += 1
            if new.f > (f + c1 * new.t * gtd) or new.f >= bracket[low].f:
                bracket[high] = new
                low, high = (0, 1) if bracket[0].f <= bracket[1].f else (1, 0)
            else:
                if abs(new.gtd) <= -c2 * gtd:
                    done = True
                elif new.gtd * (bracket[high].t - bracket[low].t) >= 0:
                    bracket[high] = bracket[low]
                bracket[low] = new
        best = bracket[low]
        return best.f, best, best.t, ls_func_evals
