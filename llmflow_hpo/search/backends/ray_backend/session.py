"""Ray itself: join a cluster or start a local Ray, the resources it has, and what its actors leave behind.

A local Ray binds to 127.0.0.1 only (``backends.ray_environment`` set Ray's single-machine mode before its
import) and keeps its temporary files in ``ray.dir/tmp``, removed at the end with the trials' staging folders.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

from llmflow_hpo.config.study import StudyConfig
from llmflow_hpo.errors import ConfigError
from llmflow_hpo.search.backends.ray_backend.trainable import staging_folder

__all__ = ["gpus_per_trial", "ray_session", "sigterm_as_sigint"]

Log = Callable[[str], None]


@contextlib.contextmanager
def ray_session(cfg: StudyConfig, log: Log) -> Iterator[Any]:
    """Join ``ray.address``, or start a local Ray (loopback only, temporary files in ``ray.dir/tmp``)."""
    import logging

    import ray

    if cfg.ray.address:
        try:
            ray.init(address=cfg.ray.address, logging_level=logging.WARNING, log_to_driver=True)
        except Exception as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"ray.address {cfg.ray.address}: cannot join the Ray cluster ({reason})") from None
        log(f"ray: joined the cluster at {cfg.ray.address} ({_resources_text(ray)})")
        try:
            yield ray
        finally:
            ray.shutdown()
        return
    assert cfg.ray.dir is not None
    tmp = Path(cfg.ray.dir) / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    link = _short_link(tmp)
    started = time.perf_counter()
    ray.init(
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=True,
        _temp_dir=str(link or tmp),
    )
    address = ray.util.get_node_ip_address()
    log(
        f"ray: started a local Ray on {address} in {time.perf_counter() - started:.1f}s ({_resources_text(ray)}), "
        f"temporary files in {tmp}"
    )
    try:
        yield ray
    finally:
        _shut_down_local(ray, tmp, link)


def _short_link(tmp: Path) -> Path | None:
    """Ray's sockets live under its temporary folder and a socket path holds at most 107 bytes: a deep
    study folder is reached through a short link in the system's temporary folder (None: not needed)."""
    if len(str(tmp)) <= 40:
        return None
    digest = hashlib.sha256(f"{tmp}:{os.getpid()}".encode()).hexdigest()[:10]
    link = Path(tempfile.gettempdir()) / f"llmflow-ray-{digest}"
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
    link.symlink_to(tmp, target_is_directory=True)
    return link


def _shut_down_local(ray: Any, tmp: Path, link: Path | None) -> None:
    """Stop the local Ray and remove what it leaves: its temporary files, the link, stale staging folders.

    ray.shutdown() returns before the actor processes it stops have exited: those that hold a staging
    folder are waited for (a few seconds at most), so that _drop_stale_staging finds them gone.
    """
    actors = [p for p in psutil.Process().children(recursive=True) if staging_folder(p.pid).exists()]
    ray.shutdown()
    psutil.wait_procs(actors, timeout=10)
    if link is not None:
        with contextlib.suppress(OSError):
            link.unlink()
    shutil.rmtree(tmp, ignore_errors=True)
    _drop_stale_staging()


def _drop_stale_staging() -> None:
    """Trial staging folders (``ray_trial``) of actor processes that are gone: a trial stopped by the
    scheduler, or a killed actor, leaves its last checkpoint there. Local Ray only: the actors ran here."""
    for folder in Path(tempfile.gettempdir()).glob("llmflow-ray-trial-*"):
        pid = folder.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _resources_text(ray: Any) -> str:
    res = ray.cluster_resources()
    return f"{res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs"


def gpus_per_trial(cfg: StudyConfig, ray: Any) -> float:
    """``ray.gpus_per_trial``, or (null) one GPU per trial when the cluster has GPUs, else none."""
    if cfg.ray.gpus_per_trial is not None:
        return cfg.ray.gpus_per_trial
    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


@contextlib.contextmanager
def sigterm_as_sigint() -> Iterator[dict[str, int]]:
    """Ray Tune stops gracefully on SIGINT (state saved, trials resumable); SIGTERM gets the same treatment."""
    got: dict[str, int] = {}

    def handler(signum: int, _frame: Any) -> None:
        got["signum"] = signum
        signal.raise_signal(signal.SIGINT)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield got
    finally:
        signal.signal(signal.SIGTERM, previous)
