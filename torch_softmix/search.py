"""From starts to the final point: screening, the continued run, resuming, and the L-BFGS phase.

:class:`~torch_softmix.em.EMFitter` decides *what* to fit; this module decides *how the search goes*
once the problem and the starts exist:

1. :func:`screen_and_continue`: every start runs ``init_max_iter`` EM iterations (or, unscreened, to
   convergence; with many starts, by successive halving); the start with the best objective continues for
   ``max_iter`` more.
2. :func:`resume_run`: the same continuation from a checkpoint's state.
3. :func:`polish_phase`: L-BFGS on the marginal likelihood from EM's point, kept only when not worse.
4. :func:`refine`: split-and-merge moves (:mod:`torch_softmix.moves`) from the converged point, each followed
   by EM and L-BFGS again, kept only when the objective rises.

Each phase reports through one run callback (:func:`run_callback`): progress bar, checkpoint, user's
``FitEvent`` callback.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from .checkpoint import Checkpointer
from .engine import FitProblem, Point, RunResult, State, run
from .moves import ranked_moves, transfer_starts
from .polish import polish
from .progress import Bars
from .starts import Start


@dataclass(frozen=True)
class Schedule:
    """How long each phase may run: EM iterations of the screening and of the continued run, the
    accelerator, L-BFGS iterations (0: no L-BFGS phase), the EM rate at which the continued run
    hands over to L-BFGS (``None``: never), and the moves and transfers tried per round (0 and 0: none)."""

    max_iter: int
    init_max_iter: int | None = 10
    accelerate: str | None = "squarem"
    polish_iter: int = 0
    switch_rate: float | None = None
    n_moves: int = 0
    n_transfers: int = 0


@dataclass
class FitEvent:
    """What a ``fit(callback=...)`` receives after every accepted EM iterate and every L-BFGS iteration:
    the phase, the start, the iteration count of the phase, per-token log-likelihood and objective, and the
    current parameters ``log_alpha (K,)``, ``beta (K, L)`` (do not modify them)."""

    phase: str  # "screening", "em" or "polish"
    start: str
    n_iter: int
    loglik: float
    objective: float
    checkpoint_written: bool = False
    history: list[dict] = field(default_factory=list, repr=False)
    log_alpha: Tensor | None = field(default=None, repr=False)
    beta: Tensor | None = field(default=None, repr=False)


def run_callback(phase: str, start: str, bar, ckpt: Checkpointer | None, user: Callable | None, n_done: int = 0):
    """The callback of one run: advance the bar, write the checkpoint when due, call the user's callback."""
    shown = [n_done]

    def on_point(point: Point, history: list[dict], n_iter: int) -> None:
        if bar is not None:
            bar.update(n_iter - shown[0])
            shown[0] = n_iter
            bar.set_postfix(loglik=f"{point.loglik:.6f}", start=start)
        written = ckpt(point, history, n_iter) if ckpt is not None else False
        if user is not None:
            st = point.state
            user(FitEvent(phase, start, n_iter, point.loglik, point.objective, bool(written), history, st.log_alpha,
                          st.beta))  # fmt: skip

    return on_point


def _record(starts: list[Start], reached: list[tuple[float, float]], best: int, info: dict, screen_iters: int) -> dict:
    return {
        "init_names": [s.name for s in starts],
        "init_results": [obj for obj, _ in reached],
        "init_logliks": [ll for _, ll in reached],
        "best_init": best,
        "init_info": info,
        "screen_iters": screen_iters,
    }


def _saved(record: dict) -> dict:
    """The part of a record a checkpoint keeps (so a resumed fit reports the same starts)."""
    return {k: v for k, v in record.items() if k != "init_info"}


#: Screening by successive halving: with more than :data:`SCREEN_FINALISTS` starts, every start first runs
#: :data:`SCREEN_FIRST_ITERS` EM iterations and only the :data:`SCREEN_FINALISTS` best run on to ``init_max_iter``.
SCREEN_FIRST_ITERS = 2
SCREEN_FINALISTS = 4


def screen_and_continue(
    problem: FitProblem, starts: list[Start], info: dict, sched: Schedule, bars: Bars, ckpt, user
) -> tuple[RunResult, dict]:
    """Run every start (screened when there are several and ``init_max_iter`` is set), continue the best.

    Screening is successive halving where there are more than :data:`SCREEN_FINALISTS` starts: all of them run
    :data:`SCREEN_FIRST_ITERS` EM iterations, the :data:`SCREEN_FINALISTS` best of those run on to
    ``init_max_iter``, and the best of these is continued. Only the finalists' states are held (each has
    ``(p, K)`` logits). Returns the final run and a record of the starts (names, the objective and
    log-likelihood each reached in screening, the best). A checkpoint covers the single start, or the run
    continued after screening.
    """
    screen = sched.init_max_iter is not None and len(starts) > 1
    iters = sched.init_max_iter if screen else sched.max_iter
    if len(starts) == 1 and ckpt is not None:
        ckpt.extra.update(init_names=[starts[0].name], screen_iters=0)
    halve = screen and len(starts) > SCREEN_FINALISTS and iters > SCREEN_FIRST_ITERS
    first, n_final = (SCREEN_FIRST_ITERS, SCREEN_FINALISTS) if halve else (iters, len(starts))
    total = first * len(starts) + (iters - first) * n_final if screen else iters
    bar = bars.open(f"screening {len(starts)} starts" if screen else "EM", total)
    reached: list[tuple[float, float]] = []  # (objective, log-likelihood) of every start, for the record
    held: dict[int, RunResult] = {}  # the finalists' runs (each state has (p, K) logits)
    for i, s in enumerate(starts):
        cb = run_callback("screening" if screen else "em", s.name, bar, ckpt if len(starts) == 1 else None, user)
        point = problem.evaluate(problem.state(s.alpha, s.beta))
        switch = None if screen else _switch(sched)
        held[i] = run(problem, point, first, accelerate=sched.accelerate, callback=cb, switch_rate=switch)
        reached.append((held[i].point.objective, held[i].point.loglik))
        for j in sorted(held, key=lambda j: -held[j].point.objective)[n_final:]:
            del held[j]
    if halve:
        for i, r in held.items():
            cb = run_callback("screening", starts[i].name, bar, None, user, r.n_iter)
            held[i] = run(problem, r.point, iters, accelerate=sched.accelerate, history=r.history, n_done=r.n_iter,
                          callback=cb)  # fmt: skip
            reached[i] = (held[i].point.objective, held[i].point.loglik)
    best = max(held, key=lambda i: held[i].point.objective)
    result = held[best]
    record = _record(starts, reached, best, info, result.n_iter if screen else 0)
    if not screen:
        return result, record
    if ckpt is not None:
        ckpt.extra.update(_saved(record))
    cb = run_callback("em", starts[best].name, bars.open("EM", sched.max_iter), ckpt, user, result.n_iter)
    limit = result.n_iter + sched.max_iter
    final = run(
        problem, result.point, limit, accelerate=sched.accelerate, history=result.history, n_done=result.n_iter,
        callback=cb, switch_rate=_switch(sched),
    )  # fmt: skip
    return final, record


def _switch(sched: Schedule) -> float | None:
    """The hand-over rate, only when there is an L-BFGS phase to hand over to."""
    return sched.switch_rate if sched.polish_iter > 0 else None


#: Rounds of moves allowed: ``max(2 K, MIN_MOVE_ROUNDS)``.
MIN_MOVE_ROUNDS = 4
#: A move is kept when it raises the per-token objective by more than this (and by more than ``tol``).
MOVE_GAIN = 1e-8
#: EM iterations each move's trial runs before the trials are compared (screening).
MOVE_SCREEN_ITERS = 10
#: Screening of a round's trials by successive halving: with more than :data:`MOVE_SCREEN_KEEP` trials, every
#: trial first runs :data:`SCREEN_FIRST_ITERS` EM iterations and only the :data:`MOVE_SCREEN_KEEP` best run on to
#: :data:`MOVE_SCREEN_ITERS`.
MOVE_SCREEN_KEEP = 8
#: A round's moves are ranked by their objective as built; this many of the best are screened by EM iterations.
MOVE_PRESCREEN = 16
#: Screened transfers continued to convergence (both; the better is kept if it gains).
MOVE_FINALISTS = 2


def _to_beat(problem: FitProblem, current: RunResult) -> float:
    """The per-token objective a trial must exceed to be kept over ``current``."""
    return current.point.objective + max(MOVE_GAIN, problem.tol)


def _gains(problem: FitProblem, trial: RunResult, current: RunResult) -> bool:
    """Whether ``trial`` raises the objective enough over ``current`` for a move to be kept."""
    return trial.point.objective > _to_beat(problem, current)


def _screened(
    problem: FitProblem, starts: list[tuple[Tensor, Tensor]], iters: int, sched: Schedule, n_final: int
) -> list[RunResult]:
    """The ``n_final`` best of the starts ``(alpha, beta)`` after ``iters`` EM iterations each, best first.

    With more than :data:`MOVE_SCREEN_KEEP` starts, successive halving: every start runs
    :data:`SCREEN_FIRST_ITERS` iterations and the :data:`MOVE_SCREEN_KEEP` best run on to ``iters``. Only the
    states still in the running are held (each has ``(p, K)`` logits).
    """
    halve = len(starts) > MOVE_SCREEN_KEEP and iters > SCREEN_FIRST_ITERS
    first, n_keep = (SCREEN_FIRST_ITERS, MOVE_SCREEN_KEEP) if halve else (iters, n_final)
    kept: list[RunResult] = []
    for alpha, beta in starts:
        kept.append(run(problem, problem.evaluate(problem.state(alpha, beta)), first, accelerate=sched.accelerate))
        kept.sort(key=lambda r: -r.point.objective)
        del kept[n_keep:]
    if halve:
        kept = [run(problem, r.point, iters, accelerate=sched.accelerate, history=r.history, n_done=r.n_iter)
                for r in kept]  # fmt: skip
        kept.sort(key=lambda r: -r.point.objective)
    return kept[:n_final]


def refine(
    problem: FitProblem, result: RunResult, sched: Schedule, bars: Bars, user, gen, start: str = ""
) -> tuple[RunResult, dict]:
    """Split-and-merge moves, then transfers, from a converged fit (:mod:`torch_softmix.moves`).

    Each round of moves builds every move there is (each pair of components merged while another is split, or
    the pair's data re-split; each split two ways: k-means and peak; at most
    :data:`~torch_softmix.moves.MAX_MOVE_TRIALS` trials, the best-scored), ranks them by their objective as
    built (:func:`~torch_softmix.moves.ranked_moves`) and screens the :data:`MOVE_PRESCREEN` best by their
    objective after a few EM iterations (successive halving: :data:`SCREEN_FIRST_ITERS` iterations for all,
    then :data:`MOVE_SCREEN_ITERS` for the :data:`MOVE_SCREEN_KEEP` best). The ``sched.n_moves`` best screened are
    continued (EM to convergence or ``max_iter`` in all, then L-BFGS), best first, and the first that raises
    the objective by more than :data:`MOVE_GAIN` per token is kept and a new round begins (at most
    ``max(2 K, 4)`` rounds); otherwise the moves end. Then, from where the moves ended, rounds of the
    ``sched.n_transfers`` best-scored transfers of each kind run the same way, except that the
    :data:`MOVE_FINALISTS` best screened are both continued and the better is kept (a later one only when it
    beats the earlier by more than :data:`MOVE_GAIN`, so that rounding never picks between near-ties): the two
    kinds' screened objectives do not tell which gains more (on a SmolLM2 case a companion transfer screened
    first and gained 8.7e-6 per token, a k-means half 1.3e-4). Transfers can only improve on what the moves
    found. Monotone: only improvements are kept. A trial never runs more EM iterations than ``max_iter``.
    """
    info = {"rounds": 0, "tried": 0, "transfers": 0, "continued": 0, "given_up": 0, "kept": 0, "gain": 0.0,
            "seconds": 0.0}  # fmt: skip
    t0, t_base = time.perf_counter(), result.history[-1]["time"]
    K = result.state.log_alpha.shape[0]
    screen = min(MOVE_SCREEN_ITERS, sched.max_iter)  # a trial never runs more EM iterations than the fit may
    # the moves' phase, then the transfers': moves keep the first finalist that gains, transfers the better of two
    for n_final, n_transfers, keep_better in ((sched.n_moves, 0, False), (MOVE_FINALISTS, sched.n_transfers, True)):
        if (n_transfers if keep_better else n_final) == 0 or K < 2:
            continue
        for _ in range(max(2 * K, MIN_MOVE_ROUNDS)):
            info["rounds"] += 1
            point = result.point
            if keep_better:
                starts = transfer_starts(problem, point, n_transfers, gen)
            else:
                starts = ranked_moves(problem, point, gen, MOVE_PRESCREEN)
            info["tried"] += len(starts)
            info["transfers"] += len(starts) if keep_better else 0
            best = None
            for lead in _screened(problem, starts, screen, sched, n_final):  # best screened first
                trial = run(problem, lead.point, sched.max_iter, accelerate=sched.accelerate,
                            history=lead.history, n_done=lead.n_iter, switch_rate=_switch(sched))  # fmt: skip
                info["continued"] += 1
                if sched.polish_iter > 0:  # L-BFGS gives up once the trial cannot beat what it must
                    rival = result if best is None or not keep_better else max(result, best, key=lambda r: r.point.objective)
                    trial, done = polish_phase(problem, trial, sched, bars, None, start, _to_beat(problem, rival))
                    info["given_up"] += int(done["gave_up"])
                if not keep_better or best is None or _gains(problem, trial, best):  # a later finalist must beat
                    best = trial  # the earlier by as much as a move must gain: rounding never decides a near-tie
                if not keep_better and _gains(problem, best, result):
                    break
            if best is None or not _gains(problem, best, result):
                break
            info["kept"] += 1
            info["gain"] += best.point.objective - result.point.objective
            n_iter = result.n_iter + best.n_iter
            entry = {"iter": n_iter, "loglik": best.point.loglik, "objective": best.point.objective,
                     "phase": "move", "move_iters": best.n_iter, "time": t_base + time.perf_counter() - t0}  # fmt: skip
            history = result.history + [entry]  # one entry per kept move: the history stays monotone
            result = RunResult(best.point, history, n_iter, best.stop)
            if user is not None:
                st = result.state
                user(FitEvent("move", start, result.n_iter, result.point.loglik, result.point.objective, False,
                              history, st.log_alpha, st.beta))  # fmt: skip
    info["seconds"] = time.perf_counter() - t0
    return result, info


def resume_run(
    problem: FitProblem, saved: tuple[State, dict], sched: Schedule, bars: Bars, ckpt: Checkpointer, user
) -> tuple[RunResult, dict]:
    """Continue a checkpointed run to the same end as the uninterrupted fit."""
    state, meta = saved
    names = meta.get("init_names") or ["resumed"]
    record = {
        "init_names": names,
        "init_results": meta.get("init_results") or [float("nan")],
        "init_logliks": meta.get("init_logliks") or [float("nan")],
        "best_init": meta.get("best_init") or 0,
        "init_info": {"resumed": True},
        "screen_iters": int(meta.get("screen_iters", 0)),
    }
    ckpt.extra.update(_saved(record))
    n_done = int(meta["n_maps"])
    bar = bars.open("EM (resumed)", sched.max_iter)
    cb = run_callback("em", names[record["best_init"]], bar, ckpt, user, n_done)
    limit = record["screen_iters"] + sched.max_iter
    result = run(
        problem, problem.evaluate(state), limit, accelerate=sched.accelerate, history=meta["history"],
        n_done=n_done, callback=cb, switch_rate=_switch(sched),
    )  # fmt: skip
    return result, record


def polish_phase(
    problem: FitProblem, result: RunResult, sched: Schedule, bars: Bars, user: Callable | None = None, start: str = "",
    target: float | None = None,
) -> tuple[RunResult, dict]:
    """L-BFGS from EM's final point; the polished point is kept only if its objective is at least EM's.

    ``target``: the per-token objective a trial must reach to be of use (a move's); the L-BFGS run gives up
    once its pace says it will not (:func:`~torch_softmix.polish.out_of_reach`). Returns the run (its ``stop``
    becomes ``"polish_tol"`` / ``"polish_max_iter"`` when the polish is kept and EM had not converged) and what
    the phase did.
    """
    t0 = time.perf_counter()
    bar = bars.open("L-BFGS", sched.polish_iter)

    def on_iteration(n_iter: int, objective: float, loglik: float, beta, log_alpha) -> None:
        if bar is not None:
            bar.update(n_iter - bar.n)
            bar.set_postfix(objective=f"{objective:.8f}")
        if user is not None:
            user(FitEvent("polish", start, n_iter, loglik, objective, False, result.history, log_alpha, beta))

    st = result.state
    pr = polish(
        problem.X, problem.counts, st.beta, st.log_alpha, problem.lam, problem.design.whitening, bias=problem.bias,
        max_iter=sched.polish_iter, tol=problem.tol, dtype=problem.dtype, chunk_size=problem.chunk_size,
        on_iteration=on_iteration,
        comm=problem.comm, n_tokens=problem.n_tokens, target=target,
    )  # fmt: skip
    point = problem.evaluate(problem.state(pr.log_alpha.exp(), pr.beta))
    kept = point.objective >= result.point.objective
    info = {
        "n_iter": pr.n_iter,
        "n_evals": pr.n_evals,
        "n_passes": pr.n_passes,
        "converged": pr.converged,
        "gave_up": pr.gave_up,
        "kept": kept,
        "objective_before": result.point.objective,
        "objective_after": point.objective,
        "seconds": time.perf_counter() - t0,
    }
    kept_point = point if kept else result.point  # the history records accepted iterates only
    entry = {"iter": result.n_iter, "loglik": kept_point.loglik, "objective": kept_point.objective, "phase": "polish"}
    result.history.append({**entry, "time": result.history[-1]["time"] + info["seconds"], "polish_iter": pr.n_iter,
                           "polish_evals": pr.n_evals})  # fmt: skip
    if not kept:
        return result, info
    stop = "tol" if result.converged else ("polish_tol" if pr.converged else "polish_max_iter")
    return RunResult(point, result.history, result.n_iter, stop), info
