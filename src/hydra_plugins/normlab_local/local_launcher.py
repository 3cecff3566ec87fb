"""The local launcher (hydra/launcher=local, the default for `-m`): a sweep's jobs on every core
of this machine, each job exactly as it would run alone.

Workers are forked from one server process (multiprocessing's forkserver, normlab.run.forkserver)
that has imported what a job needs (torch, Lightning, normlab) and has computed nothing: the
imports are paid once per sweep, and a fork never inherits a busy OpenMP thread pool (a child
forked after torch ran a parallel region hangs). The server starts first thing (train.py), so
its imports overlap the command line's checks.

Each job keeps the torch threads it would have alone (torch's default, or `torch_threads`): the
same number of threads gives the same reductions, so a job's numbers do not depend on the sweep
around it. The workers' OpenMP threads wait passively (OMP_WAIT_POLICY=PASSIVE, unless set), so
two workers' threads sharing the cores do not spin against each other.

Every job's config is composed once, in this process: the sweeper composes each job to check the
batch before launching it (Hydra's `validate_batch_is_legal`), and the launcher keeps those
configs and sends them to the workers instead of composing every job again. The composing runs
while the forkserver is still importing.

One worker per core (per `trainer.devices` cores for DDP on CPU); a sweep whose trainer is not on
the CPU runs its jobs one after another in this process (they would share one device), as does a
sweep of one job. `hydra.launcher.workers=N` says how many at once. The workers stay for the
sweep's end: its comparison figures are drawn on them, at once (`start_in_workers`).

Signals (normlab.run.signals): the launcher's process marks the sweep (`<sweep dir>/.interrupted`);
each running job sees the mark after its step, saves its checkpoint and stops, and jobs not
started are not started.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

from normlab.run import signals
from normlab.run.forkserver import forkserver

log = logging.getLogger("normlab")


class LocalLauncher(BasicLauncher):
    """Hydra's BasicLauncher on every core: jobs in forked worker processes, results in order."""

    def __init__(self, workers: int | None = None) -> None:
        from normlab.config.errors import ConfigError

        super().__init__()
        if workers is not None and (isinstance(workers, bool) or workers < 1):
            raise ConfigError(
                f"hydra.launcher.workers={workers!r} must be >= 1 (or null: one per core)")
        self.workers = workers
        self.composed: dict[tuple[str, ...], DictConfig] = {}

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        loader = hydra_context.config_loader
        self._compose = compose = type(loader).load_sweep_config.__get__(loader)

        def kept(master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
            config = compose(master_config, sweep_overrides)
            self.composed[tuple(sweep_overrides)] = config
            return config

        loader.load_sweep_config = kept  # the sweeper's check of the batch composes each job

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None
        workers = min(len(job_overrides), self.workers or workers_for(self.config))
        signals.jobs_run_in_this_process(workers <= 1)
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info(f"Launching {len(job_overrides)} jobs locally, {workers} at a time")
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
        configs = self._job_configs(job_overrides, initial_job_idx)
        if workers <= 1:
            return [self._run_here(config) for config in configs]
        return self._in_workers(configs, workers)

    def _job_configs(self, job_overrides: Sequence[Sequence[str]], first: int) -> list[DictConfig]:
        """Each job's config as Hydra composes it, numbered: the one the sweeper's check composed,
        or composed now."""
        configs = []
        for idx, overrides in enumerate(job_overrides, start=first):
            config = self.composed.pop(tuple(overrides), None)
            if config is None:
                config = self._compose(self.config, list(overrides))
            with open_dict(config):
                config.hydra.job.id = idx
                config.hydra.job.num = idx
            configs.append(config)
        return configs

    def _run_here(self, config: DictConfig) -> JobReturn:
        """One job in this process, as Hydra's BasicLauncher runs it."""
        assert self.hydra_context is not None and self.task_function is not None
        ran = run_job(hydra_context=self.hydra_context, task_function=self.task_function,
                      config=config, job_dir_key="hydra.sweep.dir",
                      job_subdir_key="hydra.sweep.subdir")
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return ran

    def _in_workers(self, configs: list[DictConfig], workers: int) -> list[JobReturn]:
        done: dict[int, JobReturn] = {}
        pool = self._pool(workers)
        pending: dict[Future, int] = {
            pool.submit(_run_one, config): config.hydra.job.num for config in configs
        }
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    done[pending.pop(future)] = future.result()
                if signals.received() is not None:
                    break  # the running jobs save and stop; the rest never start
        except BrokenProcessPool as error:  # a worker died: its job has no metrics.json
            if signals.received() is None:
                log.error("normlab: a sweep worker died (%s); the sweep stops", error)
        finally:
            if pending:
                close_workers()
        return [done[idx] for idx in sorted(done)]

    def _pool(self, workers: int) -> ProcessPoolExecutor:
        """The sweep's workers: started for its first batch, kept for the next batches and for
        the figures at its end (`start_in_workers`)."""
        import atexit

        import cloudpickle

        if "pool" not in _sweep:
            assert self.hydra_context is not None
            loader = vars(self.hydra_context.config_loader)
            kept = loader.pop("load_sweep_config", None)  # the workers compose nothing
            context = cloudpickle.dumps((self.hydra_context, self.task_function,
                                         Singleton.get_state()))
            if kept is not None:
                loader["load_sweep_config"] = kept
            _sweep["pool"] = ProcessPoolExecutor(workers, mp_context=forkserver(),
                                                 initializer=_adopt,
                                                 initargs=(context, os.getpid()))
            atexit.register(close_workers)
        return _sweep["pool"]


_sweep: dict[str, ProcessPoolExecutor] = {}  # in the launching process: the sweep's workers


def start_in_workers(function: Callable[..., Any], arguments: list[tuple]) -> Callable[[], list]:
    """Start `function(*args)` for each `args` in `arguments` on the sweep's workers, all at once
    (they have imported what a job needs); return the wait for their results (the first error is
    raised once all ended). A sweep without workers runs them here, one after the other, in the
    wait."""
    pool = _sweep.get("pool")
    if pool is None:
        return lambda: [function(*args) for args in arguments]
    futures = [pool.submit(function, *args) for args in arguments]

    def results() -> list:
        wait(futures)
        return [future.result() for future in futures]

    return results


def close_workers() -> None:
    """Stop the sweep's workers (a running job first saves and stops, if the sweep was told to)."""
    pool = _sweep.pop("pool", None)
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)


def workers_for(config: DictConfig) -> int:
    """One worker per core this process may use (per `trainer.devices` cores for DDP on CPU);
    one in all when the trainer is not on the CPU."""
    from normlab.run.process import processes_per_job

    if config.trainer.get("accelerator") != "cpu":
        return 1
    return max(1, len(os.sched_getaffinity(0)) // processes_per_job(config))


_job: dict[str, Any] = {}  # in a worker: what every job of the sweep shares


def _adopt(context: bytes, launcher: int) -> None:
    import cloudpickle

    _die_with(launcher)
    os.environ[signals.LAUNCHER_PID] = str(launcher)  # the forkserver may predate the variable
    hydra_context, task_function, singletons = cloudpickle.loads(context)
    Singleton.set_state(singletons)
    _job.update(hydra_context=hydra_context, task_function=task_function)


def _die_with(launcher: int) -> None:
    """End this worker as soon as the launching process ends: a sweep killed with SIGKILL leaves
    no job training on (the same command again continues the sweep)."""
    import select
    import signal
    import threading

    try:
        handle = os.pidfd_open(launcher)
    except ProcessLookupError:
        os._exit(1)
    except (OSError, AttributeError):  # not Linux >= 5.3: the sweep's jobs may outlive it
        return

    def watch() -> None:
        select.select([handle], [], [])
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="normlab-launcher-watch", daemon=True).start()


def _run_one(config: DictConfig) -> JobReturn:
    """One job in a worker, as Hydra's BasicLauncher runs it in its own process."""
    from hydra.core.hydra_config import HydraConfig

    setup_globals()
    HydraConfig.instance().set_config(config)
    ran = run_job(hydra_context=_job["hydra_context"], task_function=_job["task_function"],
                  config=config, job_dir_key="hydra.sweep.dir",
                  job_subdir_key="hydra.sweep.subdir")
    return _portable(ran)


def _portable(ran: JobReturn) -> JobReturn:
    """The job's return for the launcher's process: its value or error, status, dir. Its configs
    stay behind (they are in the job dir's .hydra/; their schema classes are this worker's)."""
    from hydra.core.utils import JobStatus

    ran.cfg = ran.hydra_cfg = None
    if ran.status == JobStatus.FAILED and isinstance(ran._return_value, BaseException):
        error = ran._return_value
        ran._return_value = RuntimeError(f"{type(error).__name__}: {error}")
    return ran
