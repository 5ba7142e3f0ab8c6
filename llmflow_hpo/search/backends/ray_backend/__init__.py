"""The Ray Tune backend: the same study, its trials run by Ray Tune on a local Ray or a cluster.

What comes from where:

- Parameters: Ray's ``OptunaSearch`` asks the study's own sampler (the configured one, seeded per trial)
  over the study's optuna distributions, in the study itself: the trials it asks are the study's trials.
  PBT cannot run with a search algorithm (Ray refuses it), so its population is drawn at random by Ray
  from the same distributions, and each Ray trial becomes a study trial when it starts.
- Stopping: a Ray scheduler (ASHA, HyperBand, median stopping, PBT) instead of the optuna pruner. Its time
  unit is training examples seen, the step every evaluation is reported at in both backends (HyperBand:
  evaluations, see ``schedulers.build_scheduler``).
- Recording: ``recorder.StudyRecorder``, a Ray Tune callback in the driver, writes every evaluation and the
  end of every trial into the study. Only the driver needs the storage; Ray's workers never open it.
- Resume: ``runs.RayTrials`` restores an interrupted Ray run before it starts a new one.

Modules by concern: ``trainable`` (what a Ray worker runs per trial), ``recorder`` (the driver's callback
and searcher), ``schedulers`` (schedulers, domains, PBT's mutations; validate's rules too), ``session``
(Ray itself), ``runs`` (this backend's part of ``search.driver.run_search``). This package imports nothing
itself: ``schedulers`` is imported alone by ``validate``, the rest by ``backends.import_ray_backend`` after
it has set Ray's environment.
"""
