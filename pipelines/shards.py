"""Sharded, resumable jobs over a dataset: in-process or on a Ray actor pool, one shared code path.

A job's samples are cut into fixed shards by position. A worker turns one shard into a set of
files written atomically (a temporary folder renamed into place), so a shard that exists is
complete and is never recomputed; a worker that dies mid-shard leaves nothing behind. A Ray
pass hands the missing shards to a pool of actors (Ray Core's `ActorPool`, one model each);
when an actor dies the pass ends, and the next pass, on fresh actors, runs whatever is still
missing. Every sample therefore ends up written exactly once. The shards are the unit of
recovery, so Ray's own actor restarts stay off (its default for actors).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm


@dataclass(frozen=True)
class Shard:
    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}"


def plan_shards(n: int, shard_size: int) -> list[Shard]:
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [
        Shard(i, start, min(start + shard_size, n))
        for i, start in enumerate(range(0, n, shard_size))
    ]


def folder_digest(
    folder: str | Path | None, suffixes: tuple[str, ...] = (), recursive: bool = False
) -> str | None:
    """One hash over a folder's files (those ending in one of `suffixes`, default all; with
    `recursive`, also those in its subfolders, named by their relative path); None for
    anything but a folder."""
    if folder is None or not Path(folder).is_dir():
        return None
    root = Path(folder)
    digest = hashlib.blake2b(digest_size=16)
    for path in sorted(root.rglob("*") if recursive else root.iterdir()):
        if path.is_file() and (not suffixes or path.suffix in suffixes):
            digest.update(path.relative_to(root).as_posix().encode())
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 24), b""):
                    digest.update(block)
    return digest.hexdigest()


def guard_resume(
    spec_path: Path,
    job: dict,
    keys: Sequence[str],
    inputs: dict[str, str | None],
    details: Callable[[], dict] | None = None,
) -> None:
    """Resume only the same job on the same inputs; the first run writes `spec_path`.

    `keys` are the job fields that decide its output; `inputs` are digests of the folders it
    reads (`folder_digest`): a model retrained in place keeps its path, not its weights, and
    must not resume the old model's results, nor may a run that did not record one of them.
    `details()` adds what readers of the spec want.
    """
    job = json.loads(json.dumps(job))
    if not spec_path.is_file():
        spec_path.parent.mkdir(parents=True, exist_ok=True)
        spec = {"job": job, "inputs": inputs, **(details() if details else {})}
        spec_path.write_text(json.dumps(spec, indent=1))
        return
    stored = json.loads(spec_path.read_text())
    changed = {k for k in keys if stored["job"].get(k) != job.get(k)}
    # an input the stored run did not record cannot be shown to match: refused too
    changed |= {k for k, v in inputs.items() if stored.get("inputs", {}).get(k) != v}
    if changed:
        raise ValueError(
            f"{spec_path.parent} holds a run with other {sorted(changed)}; use a new --out folder"
        )


def shard_done(out_dir: Path, shard: Shard) -> bool:
    return (out_dir / "shards" / shard.name).is_dir()


def commit_shard(out_dir: Path, shard: Shard, write: Callable[[Path], None]) -> None:
    """Let `write` fill a temporary folder, then rename it into place in one step."""
    shards = out_dir / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    if shard_done(out_dir, shard):
        return
    tmp = Path(tempfile.mkdtemp(prefix=f".{shard.name}-", dir=shards))
    try:
        write(tmp)
        os.rename(tmp, shards / shard.name)
    except OSError:
        if not shard_done(out_dir, shard):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class ShardWorker:
    """Ray actor (or plain object) that builds its processor once and runs shards with it.

    `factory(**kwargs)` returns a function `process(shard, out_dir)` that writes the shard.
    """

    def __init__(self, factory: Callable[..., Callable], kwargs: dict, out_dir: str) -> None:
        self.process = factory(**kwargs)
        self.out_dir = Path(out_dir)

    def run(self, shard: Shard) -> int:
        if not shard_done(self.out_dir, shard):
            self.process(shard, self.out_dir)
        return shard.index


RAY_PASSES = 3


@dataclass
class RayOptions:
    """How to run on Ray: `address` joins a cluster (else a local one starts)."""

    workers: int = 1
    address: str | None = None
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0


def run_shards(
    shards: Sequence[Shard],
    out_dir: Path,
    factory: Callable[..., Callable],
    kwargs: dict,
    ray_options: RayOptions | None = None,
    desc: str = "shards",
    progress: bool = True,
) -> int:
    """Run every missing shard; returns how many were computed in this call."""
    todo = [s for s in shards if not shard_done(out_dir, s)]
    missing = len(todo)
    if not todo:
        return 0
    bar = tqdm(
        total=len(shards),
        initial=len(shards) - missing,
        desc=desc,
        unit="shard",
        disable=not progress,
    )
    if ray_options is None:
        worker = ShardWorker(factory, kwargs, str(out_dir))
        for shard in todo:
            worker.run(shard)
            bar.update(1)
    else:
        import ray

        started_here = _init_ray(ray_options)
        try:
            for _ in range(RAY_PASSES):
                _run_on_ray(todo, out_dir, factory, kwargs, ray_options, bar)
                todo = [s for s in todo if not shard_done(out_dir, s)]
                if not todo:
                    break
        finally:
            if started_here:  # a local cluster we started must not linger (CPU, memory)
                ray.shutdown()
        if todo:
            raise RuntimeError(f"{len(todo)} shards still missing after {RAY_PASSES} Ray passes")
    bar.close()
    return missing


def _init_ray(options: RayOptions) -> bool:
    """Connect to Ray (the given cluster, else a local one); True if this call started it."""
    import ray

    logging.getLogger("ray").setLevel(logging.ERROR)
    if ray.is_initialized():
        return False
    init = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
    if options.address:
        ray.init(address=options.address, **init)
    else:
        temp = Path(tempfile.gettempdir()) / f"adaptive-m3-ray-{os.getuid()}"
        ray.init(num_cpus=max(2, options.workers), _temp_dir=str(temp), **init)
    return True


def _run_on_ray(todo, out_dir, factory, kwargs, options: RayOptions, bar) -> None:
    """One pass: the shards `todo` over a pool of actors; an actor's death ends the pass."""
    import ray
    from ray.util import ActorPool

    actor = ray.remote(ShardWorker).options(
        num_cpus=options.cpus_per_worker, num_gpus=options.gpus_per_worker
    )
    actors = [
        actor.remote(factory, kwargs, str(out_dir)) for _ in range(min(options.workers, len(todo)))
    ]
    try:
        for _ in ActorPool(actors).map_unordered(lambda a, shard: a.run.remote(shard), todo):
            bar.update(1)
    except ray.exceptions.RayError as error:  # the next pass runs what is still missing
        logging.getLogger(__name__).warning("Ray pass ended early: %s", error)
    finally:
        for a in actors:
            ray.kill(a)
