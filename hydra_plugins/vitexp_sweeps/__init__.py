"""vitexp's Hydra plugins (Hydra finds plugins only inside the `hydra_plugins` namespace).

- `local_gpus.LocalGPUsLauncher` (`hydra/launcher=local_gpus`): a sweep's jobs in parallel,
  one GPU each, scheduled by Ray on this machine or a Ray cluster;
- `resumable_optuna.ResumableOptunaSweeper` (`hydra/sweeper=optuna_resumable`, which the
  `hparams_search=…` presets use): Hydra's Optuna sweeper, continuing its study when re-run.

Hydra imports every public module here at start-up to find plugins, so these modules import
only Hydra; Ray and Optuna are imported from the private modules when a sweep starts.
"""
