"""`hparams_search=optuna`: hydra-optuna-sweeper with a study that survives a crashed sweep.

(In the `hydra_plugins` namespace because Hydra instantiates sweepers only from there; src/ is
on the path of lmlab's install, so Hydra's plugin scan finds it.)

The study is stored in SQLite in the sweep directory (`conf/hparams_search/optuna.yaml`), and the
sweep directory is the same for the same command (`lmlab.sweep`), so running the command again
continues the study: `hydra.sweeper.n_trials` counts the study's finished trials (completed or
pruned), not the trials of this invocation — a study of 20 that crashed after 12 runs 8 more.
Trials a crash left `RUNNING` are marked failed, and new trials take job directories numbered
after every existing trial, so directory N holds trial N and no earlier trial's record is reused.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

log = logging.getLogger("lmlab")


def continue_study(storage: Any, study_name: str | None) -> tuple[int, int]:
    """(finished trials, all trials) of a stored study; marks trials left running as failed."""
    import optuna
    from optuna.trial import TrialState

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:  # optuna 2.x: no such study yet
        return 0, 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        log.warning("optuna: trial %d was left running by an interrupted sweep; marking it failed", trial.number)
        study._storage.set_trial_state(trial._trial_id, TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    return finished, len(trials)


class ResumableOptunaSweeper(OptunaSweeper):
    def sweep(self, arguments: list[str]) -> None:
        impl = self.sweeper
        if impl.storage:
            # SQLite creates the file, not the directory; the launcher makes it only later.
            Path(str(impl.sweep_dir)).mkdir(parents=True, exist_ok=True)
            finished, total = continue_study(impl.storage, impl.study_name)
            if total:
                log.info("optuna: continuing study %r: %d trials finished of n_trials=%d",
                         impl.study_name, finished, impl.n_trials)
            impl.n_trials = max(0, impl.n_trials - finished)
            impl.job_idx = total
        return super().sweep(arguments)
