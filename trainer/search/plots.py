"""PNG plots of a study with ``optuna.visualization.matplotlib`` (Agg backend, no display).

- ``history.png`` — quality per trial and the best so far;
- ``importances.png`` — fANOVA parameter importances for quality, when at least two trials are
  complete and Optuna can compute them (it cannot when no parameter varies, for instance);
- ``pareto.png`` — the Pareto front, in multi-objective studies (two or three objectives).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

__all__ = ["write_plots"]

_log = logging.getLogger(__name__)
_AXIS_NAMES = {"latency": "latency p99 (ms, scaled to the profile)", "size": "artifact size (bytes)"}


def _quality(trial: Any) -> float:
    return float(trial.values[0])


def write_plots(study: Any, folder: Path) -> list[Path]:
    """Write the plots above into ``folder`` (created if needed). Returns the files written.

    A plot that Optuna cannot draw for this study is left out (logged at INFO), never an error.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm
    from optuna.trial import TrialState

    objectives = list(study.user_attrs.get("objectives", ["quality"]))
    multi = len(study.directions) > 1
    target = {"target": _quality, "target_name": "quality"} if multi else {"target_name": "quality"}
    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    plots: list[tuple[str, Any]] = [("history", lambda: ovm.plot_optimization_history(study, **target))]
    if complete >= 2:
        plots.append(("importances", lambda: ovm.plot_param_importances(study, **target)))
    if multi and len(study.directions) <= 3:
        names = [_AXIS_NAMES.get(o, o) for o in objectives]
        plots.append(("pareto", lambda: ovm.plot_pareto_front(study, target_names=names)))
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in plots:
        try:
            with warnings.catch_warnings():  # the matplotlib backend is flagged experimental
                warnings.simplefilter("ignore")
                ax = draw()
        except (ValueError, RuntimeError, ZeroDivisionError) as e:
            _log.info("no %s plot for study %s: %s", name, study.study_name, e)
            plt.close("all")
            continue
        path = folder / f"{name}.png"
        ax.figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(ax.figure)
        written.append(path)
    return written
