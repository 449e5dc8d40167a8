"""Training checkpoints: the trainable half, optimiser state, step, RNG and data position.

Built on `orbax.checkpoint.CheckpointManager`. Each step directory holds two items:

  state/  (Orbax StandardSave)  {"trainable": [arrays], "opt_state": [arrays], "rng": key data}
  meta/   (Orbax JsonSave)      step, data position, metrics, RNG impl, and for every array its
                                pytree path, shape and dtype (so a mismatch is reported by name)

Arrays are saved as flat lists in `jax.tree_util` order rather than as the pytree itself:
the trainable half contains SVFT nodes whose static metadata (pattern, layout) is not
data, and `None` holes; the live `trainable`/`opt_state` templates supply the structure on
restore (re-run `svft_jax.apply` on the base and `tx.init` to get them).

Only the small trainable part is stored: U, s, V and W0 are re-derived from the base model.
Retention keeps the newest `max_to_keep` steps and, with `best_metric`, also the best
`keep_best` steps by that metric. A step counts as complete only when Orbax's commit
marker (`commit_success.txt`, written last, just before the atomic rename) is present;
anything else (a tmp directory left by a kill, a half-copied step) is never restored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from svft_jax._paths import path_to_str
from svft_jax.checkpoint._files import ensure_directory

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "svft-jax-train-checkpoint"
CHECKPOINT_VERSION = 1
MARKER_FILE = "svft_jax_checkpoints.json"
COMMIT_FILE = "commit_success.txt"  # orbax.checkpoint's atomicity_types.COMMIT_SUCCESS_FILE
_ORBAX_ROOT_FILES = {"_ROOT_METADATA", "_CHECKPOINT_METADATA", "descriptor"}


@dataclasses.dataclass(frozen=True)
class RestoredState:
    """What `TrainCheckpointer.restore*` returns.

    Attributes:
      step: the saved step.
      trainable: the trainable half, with the template's structure (SVFT nodes, None holes).
      opt_state: the optimiser state, with the template's structure (None if not restored).
      rng: the PRNG key (typed key if one was saved typed), or None.
      data_position: the int or JSON dict given to `save`, or None.
      metrics: the metrics given to `save` (floats), or None.
    """

    step: int
    trainable: Any
    opt_state: Any
    rng: Any
    data_position: Any
    metrics: dict | None

    def __iter__(self):
        """Unpacks as `step, trainable, opt_state = restored` (the training driver's protocol)."""
        return iter((self.step, self.trainable, self.opt_state))


def _leaves_with_paths(tree) -> list[tuple[str, Any]]:
    return [(path_to_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _describe(leaves) -> list[dict]:
    return [{"path": p, "shape": [int(s) for s in np.shape(x)], "dtype": str(jnp.result_type(x))} for p, x in leaves]


def _json_metrics(metrics) -> dict | None:
    if metrics is None or (isinstance(metrics, dict) and not metrics):  # {}: no eval this step
        return None
    if not isinstance(metrics, dict):
        raise TypeError(f"`metrics` must be a dict of scalars, got {type(metrics).__name__}.")
    out = {}
    for name, value in metrics.items():
        try:
            out[str(name)] = float(np.asarray(jax.device_get(value)))
        except (TypeError, ValueError) as err:
            raise TypeError(f"metrics[{name!r}] must be a scalar, got {value!r}.") from err
    return out


class TrainCheckpointer:
    """Save and resume SVFT training with Orbax.

    Example:
      ckpt = TrainCheckpointer("runs/sst2/ckpt", max_to_keep=3, best_metric="accuracy")
      restored = ckpt.restore_latest(trainable, opt_state)      # None on a fresh run
      if restored is not None:
          start, trainable, opt_state = restored.step + 1, restored.trainable, restored.opt_state
      ...
      ckpt.save(step, trainable, opt_state, {"accuracy": acc}, rng=rng, data_position=step)
      ckpt.close()
    """

    def __init__(self, directory, *, max_to_keep: int | None = 3, best_metric: str | None = None,
                 best_mode: str = "max", keep_best: int = 1, async_save: bool = False):
        """Open (or create) a checkpoint directory.

        Args:
          directory: folder of step sub-directories; created if missing. A non-empty folder
            that was not created by TrainCheckpointer is refused (ValueError).
          max_to_keep: newest complete steps to keep (None keeps all).
          best_metric: name of a metric passed to `save`; the best `keep_best` steps by it are
            kept in addition to the newest ones, and `best_step()` reports the best.
          best_mode: "max" (accuracy) or "min" (loss).
          keep_best: how many best steps to keep (with `best_metric`).
          async_save: write in a background thread (`save` returns early; call
            `wait_until_finished` or `close`). The default waits, since SVFT's trainable
            state is small.
        """
        if best_mode not in ("max", "min"):
            raise ValueError(f"`best_mode` must be 'max' or 'min', got {best_mode!r}.")
        if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
            raise ValueError(f"`max_to_keep` must be a positive int or None, got {max_to_keep!r}.")
        if not isinstance(keep_best, int) or keep_best < 1:
            raise ValueError(f"`keep_best` must be a positive int, got {keep_best!r}.")
        self.directory = Path(directory).absolute()
        self.best_metric = best_metric
        self._async_save = async_save
        self._claim_directory()
        self._quarantine_incomplete_steps()

        keep: list = [policies.LatestN(max_to_keep)]
        best_fn = None
        if best_metric is not None:
            def best_fn(metrics, name=best_metric):
                return metrics[name]
            # Steps saved without metrics are ranked by recency only (else BestN keeps them forever).
            keep.append(policies.BestN(get_metric_fn=best_fn, reverse=best_mode == "min", n=keep_best,
                                       keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            best_fn=best_fn, best_mode=best_mode,
            preservation_policy=policies.AnyPreservationPolicy(keep),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # tmp dirs left by a killed save are never complete
            create=True,
        )
        self._options = options
        self._manager = self._open_manager()

    def _open_manager(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(self.directory, options=self._options, item_names=("state", "meta"))

    def _recover_from_failed_save(self, step: int) -> None:
        """Drop the failed step's Orbax tmp folder and start a fresh manager, so retrying works.

        The tmp folder holds only the partial step being written (Orbax would delete it on
        the next start anyway); finished steps are not touched.
        """
        for cleanup in (self._manager.wait_until_finished, self._manager.close):
            with contextlib.suppress(Exception):  # the failure may resurface here
                cleanup()
        # When one item of a synchronous save fails, Orbax raises at once while the other
        # items' writer threads are still running; they would re-create files under the tmp
        # folder while we delete it. Let them finish first.
        for thread in threading.enumerate():
            if type(thread).__name__ == "_SignalingThread" and thread is not threading.current_thread():
                thread.join(timeout=60)
        for partial in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
            shutil.rmtree(partial, ignore_errors=True)
        self._manager = self._open_manager()

    # ----------------------------------------------------------------------------- set-up
    def _claim_directory(self) -> None:
        """Create the folder and our marker, or refuse a folder that holds something else."""
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"checkpoint directory {str(self.directory)!r} is a file; pass a folder path.")
        ensure_directory(self.directory, "training checkpoints")
        marker = self.directory / MARKER_FILE
        if marker.exists():
            try:
                info = json.loads(marker.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise ValueError(f"{str(marker)!r} is unreadable or corrupted ({err}); is {str(self.directory)!r} an svft-jax checkpoint directory?") from err
            if info.get("format") != CHECKPOINT_FORMAT or info.get("version") != CHECKPOINT_VERSION:
                raise ValueError(f"{str(self.directory)!r} holds {info.get('format')!r} version {info.get('version')!r} checkpoints; this svft-jax reads {CHECKPOINT_FORMAT!r} version {CHECKPOINT_VERSION}.")
            return
        foreign = sorted(p.name for p in self.directory.iterdir() if p.name not in _ORBAX_ROOT_FILES)
        if foreign:
            raise ValueError(f"{str(self.directory)!r} is not empty and was not created by svft_jax TrainCheckpointer (no {MARKER_FILE}; found {foreign[:5]}). Pass a new or empty directory so nothing there is deleted by checkpoint retention.")
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION}))
        tmp.replace(marker)

    def _step_dirs(self) -> dict[int, Path]:
        return {int(p.name): p for p in self.directory.iterdir() if p.is_dir() and p.name.isdigit()}

    def _is_complete(self, step_dir: Path) -> bool:
        return (step_dir / COMMIT_FILE).is_file() and (step_dir / "meta").is_dir() and (step_dir / "state").is_dir()

    def _quarantine_incomplete_steps(self) -> None:
        """Rename step folders without a commit marker to '<step>.incomplete-<time>'.

        Orbax on a local disk treats any '<step>' folder as finished; a half-copied one
        would then count towards retention and block saving that step again. Renaming keeps
        the bytes (nothing is deleted) and hides them from Orbax.
        """
        for step, step_dir in sorted(self._step_dirs().items()):
            if not self._is_complete(step_dir):
                target = step_dir.with_name(f"{step}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
                logger.warning("checkpoint step %d in %s is incomplete (no %s); moved to %s and ignored.", step, self.directory, COMMIT_FILE, target.name)
                step_dir.rename(target)

    # ----------------------------------------------------------------------------- queries
    def all_steps(self) -> list[int]:
        """Complete steps on disk, ascending."""
        return sorted(s for s, d in self._step_dirs().items() if self._is_complete(d))

    def latest_step(self) -> int | None:
        """The newest complete step, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The best complete step by `best_metric` (the latest one without a best metric)."""
        if self.best_metric is None:
            return self.latest_step()
        self._manager.reload()
        best = self._manager.best_step()
        return best if best in self.all_steps() else self.latest_step()

    # ----------------------------------------------------------------------------- save
    def save(self, step: int, trainable, opt_state=None, metrics: dict | None = None, *,
             rng=None, data_position=None, force: bool = False) -> bool:
        """Save one step. Returns True if a checkpoint was written.

        Args:
          step: the training step (non-negative int, larger than every saved step).
          trainable: the trainable half from `svft_jax.split` (M, gates, extra leaves).
          opt_state: the optimiser state (any pytree of arrays), or None.
          metrics: dict of scalars, or None; when given, it must contain `best_metric` (if
            set). Steps saved without metrics compete for `max_to_keep` only.
          rng: a PRNG key (typed `jax.random.key` or raw uint32), or None.
          data_position: where the data stream is (an int or a JSON-able dict), or None.
          force: passed to Orbax (save even if its policy would skip the step).
        Raises:
          ValueError/TypeError for bad arguments (before anything is written); OSError with
          the directory named for I/O failures (disk full: earlier steps are untouched).
        """
        if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
            raise TypeError(f"`step` must be a non-negative int, got {step!r}.")
        step = int(step)
        latest = self.latest_step()
        if latest is not None and step <= latest:
            raise ValueError(f"step {step} is not after the latest saved step {latest} in {str(self.directory)!r}; steps must increase (restore_latest to resume).")
        json_metrics = _json_metrics(metrics)
        if self.best_metric is not None and json_metrics is not None and self.best_metric not in json_metrics:
            raise ValueError(f"best_metric={self.best_metric!r} is not in metrics {sorted(json_metrics or {})}; pass it to save() so retention can rank this step.")
        try:
            json.dumps(data_position)
        except TypeError as err:
            raise TypeError(f"`data_position` must be an int or a JSON-serialisable dict, got {type(data_position).__name__}: {err}.") from err

        trainable_leaves = _leaves_with_paths(trainable)
        opt_leaves = _leaves_with_paths(opt_state) if opt_state is not None else []
        state: dict[str, Any] = {}
        if trainable_leaves:
            state["trainable"] = [x for _, x in trainable_leaves]
        else:
            raise ValueError("`trainable` has no arrays; pass the first half of svft_jax.split(adapted).")
        if opt_leaves:
            state["opt_state"] = [x for _, x in opt_leaves]
        rng_info = None
        if rng is not None:
            typed = jnp.issubdtype(jnp.result_type(rng), jax.dtypes.prng_key)
            state["rng"] = jax.random.key_data(rng) if typed else jnp.asarray(rng)
            rng_info = {"typed": bool(typed), "impl": str(jax.random.key_impl(rng)) if typed else None}
        meta = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": step,
            "data_position": data_position, "metrics": json_metrics, "rng": rng_info,
            "trainable": _describe(trainable_leaves), "opt_state": _describe(opt_leaves) if opt_state is not None else None,
        }
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        try:
            saved = self._manager.save(step, args=args, metrics=json_metrics, force=force)
            if not self._async_save:
                self._manager.wait_until_finished()
        except Exception as err:
            self._recover_from_failed_save(step)
            if isinstance(err, OSError):
                raise OSError(err.errno, f"could not save checkpoint step {step} to {str(self.directory)!r}: {err.strerror or err}. Earlier steps are untouched; the partial step was removed.") from err
            raise
        return bool(saved)

    def wait_until_finished(self) -> None:
        """Block until an asynchronous save has been committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release Orbax's resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ----------------------------------------------------------------------------- restore
    def restore_latest(self, template_trainable=None, template_opt_state=None) -> RestoredState | None:
        """Restore the newest complete step into the templates' structure, or None if none.

        Args:
          template_trainable: the trainable half of a freshly applied model (same config).
          template_opt_state: `tx.init(template_trainable)`, or None to skip the optimiser.
        """
        step = self.latest_step()
        return None if step is None else self.restore(step, template_trainable, template_opt_state)

    def restore(self, step: int, template_trainable=None, template_opt_state=None) -> RestoredState:
        """Restore one complete step (e.g. `best_step()`) into the templates' structure.

        Raises:
          ValueError if the step is missing/incomplete, not ours, or was saved from a tree
          with other paths, shapes or dtypes than the template (different pattern, rank,
          targets or optimiser).
        """
        if template_trainable is None:
            raise TypeError("restore needs `template_trainable`: the trainable half of svft_jax.split(svft_jax.apply(base_params, <same config>)); the checkpoint stores arrays, not the SVFT structure.")
        if step not in self.all_steps():
            raise ValueError(f"no complete checkpoint for step {step} in {str(self.directory)!r}; complete steps: {self.all_steps()}.")
        where = f"checkpoint step {step} in {str(self.directory)!r}"
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as err:  # orbax raises many types for unreadable JSON
            raise ValueError(f"{where} is unreadable: {err}") from err
        if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{where} was not written by svft_jax TrainCheckpointer.")
        if meta.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"{where} has version {meta.get('version')!r}; this svft-jax reads version {CHECKPOINT_VERSION}.")

        trainable_leaves = _leaves_with_paths(template_trainable)
        _check_same_leaves(meta["trainable"], trainable_leaves, "trainable", where)
        abstract: dict[str, Any] = {"trainable": [_abstract(x) for _, x in trainable_leaves]}
        opt_leaves = None
        if template_opt_state is not None:
            if meta["opt_state"] is None:
                raise ValueError(f"{where} has no optimiser state; pass template_opt_state=None.")
            opt_leaves = _leaves_with_paths(template_opt_state)
            _check_same_leaves(meta["opt_state"], opt_leaves, "opt_state", where)
            if opt_leaves:
                abstract["opt_state"] = [_abstract(x) for _, x in opt_leaves]
        elif meta["opt_state"]:
            abstract["opt_state"] = [jax.ShapeDtypeStruct(tuple(d["shape"]), jnp.dtype(d["dtype"])) for d in meta["opt_state"]]
        if meta["rng"] is not None:
            key_shape = _rng_data_shape(meta["rng"])
            abstract["rng"] = jax.ShapeDtypeStruct(key_shape, jnp.uint32, sharding=_default_sharding())
        try:
            state = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
        except Exception as err:  # truncated tensorstore chunks, missing files, ...
            raise ValueError(f"{where} is damaged and cannot be read ({type(err).__name__}: {err}). Restore an earlier step with restore(step, ...); complete steps: {self.all_steps()}.") from err

        trainable = _unflatten_like(template_trainable, state["trainable"])
        opt_state = _unflatten_like(template_opt_state, state.get("opt_state", [])) if template_opt_state is not None else None
        rng = None
        if meta["rng"] is not None:
            rng = state["rng"]
            if meta["rng"]["typed"]:
                rng = jax.random.wrap_key_data(rng, impl=meta["rng"]["impl"])
        return RestoredState(step=int(meta["step"]), trainable=trainable, opt_state=opt_state, rng=rng,
                             data_position=meta["data_position"], metrics=meta["metrics"])


def _rng_data_shape(info: dict) -> tuple[int, ...]:
    if info["typed"]:
        return tuple(jax.random.key_data(jax.random.key(0, impl=info["impl"])).shape)
    return tuple(jax.random.key_data(jax.random.PRNGKey(0)).shape)


def _default_sharding():
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _abstract(leaf):
    sharding = leaf.sharding if isinstance(leaf, jax.Array) else _default_sharding()
    return jax.ShapeDtypeStruct(np.shape(leaf), jnp.result_type(leaf), sharding=sharding)


def _check_same_leaves(saved: list[dict], leaves, what: str, where: str) -> None:
    have = _describe(leaves)
    if len(saved) != len(have):
        saved_paths, have_paths = {d["path"] for d in saved}, {d["path"] for d in have}
        extra = sorted(saved_paths - have_paths)[:3]
        missing = sorted(have_paths - saved_paths)[:3]
        raise ValueError(f"{where}: the saved {what} has {len(saved)} arrays, the template {len(have)} (only in the checkpoint: {extra}; only in the template: {missing}). Re-create the template with the config used for training (targets, pattern, extra, optimiser).")
    for s, h in zip(saved, have, strict=True):
        if s != h:
            raise ValueError(f"{where}: {what} leaf {s['path']!r} is {tuple(s['shape'])} {s['dtype']} in the checkpoint but {h['path']!r} is {tuple(h['shape'])} {h['dtype']} in the template; the checkpoint was made with another pattern/d/k/rank/targets or optimiser.")


def _unflatten_like(template, leaves):
    treedef = jax.tree_util.tree_structure(template)
    template_leaves = jax.tree_util.tree_leaves(template)
    # Keep numpy leaves numpy (e.g. a step counter the user keeps on host).
    leaves = [x if isinstance(t, jax.Array) else np.asarray(x) for t, x in zip(template_leaves, leaves, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, leaves)
