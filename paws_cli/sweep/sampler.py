"""`paws sweep --trials N`: optuna's TPE sampler over the given values (categorical), instead of the full grid.

The sampler keeps no state of its own: each proposal builds an in-memory study from the finished trials (their
validation top-1; failed ones as failed) and asks once, with the seed ``seed + len(history)``. A proposal is
therefore a function of the finished trials, and a resumed sweep proposes what an uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from paws_cli.sweep.grid import Axis, Trial, trial_from_params

__all__ = ["import_optuna", "propose"]

INSTALL_HINT = "pip install 'paws-cli[sweep]'"


def import_optuna() -> Any:
    """optuna, or a clear error naming the extra that installs it."""
    try:
        import optuna
    except ImportError:
        raise ValueError(
            f"paws sweep --trials needs optuna (a TPE sampler); install it with {INSTALL_HINT}, or leave out "
            "--trials to run the full grid"
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def propose(
    axes: Sequence[Axis], history: Sequence[tuple[dict[str, str], float | None]], *, seed: int, startup: int
) -> Trial:
    """The next trial TPE proposes after ``history`` ((swept values, validation top-1 or None if failed), in the
    order they finished). The first ``startup`` proposals are TPE's random start-up draws."""
    optuna = import_optuna()
    distributions = {
        a.key: optuna.distributions.CategoricalDistribution(list(a.values)) for a in axes if a.varies
    }
    sampler = optuna.samplers.TPESampler(seed=seed + len(history), n_startup_trials=startup)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for params, value in history:
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions=distributions,
                value=value,
                state=optuna.trial.TrialState.COMPLETE if value is not None else optuna.trial.TrialState.FAIL,
            )
        )
    asked = study.ask(distributions)
    return trial_from_params(axes, {k: str(v) for k, v in asked.params.items()})
