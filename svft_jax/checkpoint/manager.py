"""Training checkpoints: the trainable half, optimiser state, step, RNG and data position.

Built on `orbax.checkpoint.CheckpointManager`, through its public options and methods only.
Each step directory holds two items:

  state/  (Orbax StandardSave)  {"trainable": [arrays], "opt_state": [arrays], "rng": key data}
  meta/   (Orbax JsonSave)      step, data position, metrics, RNG impl; for every array its
                                pytree path, shape and dtype; per adapter target its whole
                                configuration (with a digest of Ω) and, given `frozen=`, the
                                fingerprint of its base kernel; a SHA-256 of the arrays and a
                                SHA-256 of the metadata itself

Arrays are saved as flat lists in `jax.tree_util` order rather than as the pytree itself:
the trainable half contains adapter nodes whose static metadata (pattern, layout) is not
data, and `None` holes; the live `trainable`/`opt_state` templates supply the structure on
restore (re-run `svft_jax.apply` on the base and `tx.init` to get them). A template whose
configuration, Ω or base differs from the checkpoint's is refused, naming the target and
the field, so M is never installed on an adapter where it means something else.

What the directory promises (each is tested, most under SIGKILL):
  * A step counts only when complete (Orbax's commit marker, written last before its
    atomic rename); a half-written or half-deleted step is never restored and is removed
    when the directory is next opened for writing.
  * Retention (`max_to_keep`, `best_metric`) ranks a NaN/inf metric worst, so a diverged
    evaluation never deletes the best step. Deleted steps are first renamed into a trash
    folder (Orbax's `todelete_subdir`, atomic) and then removed, so a kill during retention
    leaves nothing that the next open does not clean.
  * One adapter configuration per folder: a step whose targets, per-target configuration,
    trainable leaves or (with `frozen=`) base differ from the steps already there is refused
    before anything is written, so a second run can never make retention delete the first
    run's steps.
  * One writer at a time: a second process opening the same folder for writing is refused
    (an advisory `flock`, released by the kernel even on SIGKILL). `read_only=True` restores
    without writing anything (a read-only mount, another run's folder).
  * An edited or damaged step (metadata or arrays) is refused with ValueError; I/O failures
    while saving (disk full included) raise OSError, and earlier steps stay byte-identical.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
import warnings
import weakref
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from svft_jax._args import check_bool
from svft_jax._paths import path_to_str
from svft_jax.checkpoint._directory import (  # noqa: F401  (names of this module before the split)
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    COMMIT_FILE,
    LOCK_FILE,
    MARKER_FILE,
    TRASH_DIR,
    CheckpointDirectory,
)
from svft_jax.checkpoint.fingerprint import kernel_fingerprint, leaves_by_path
from svft_jax.core import is_node
from svft_jax.errors import CheckpointWarning

logger = logging.getLogger(__name__)

STEP_VERSION = 2  # 2: per-target config, Ω digest, base fingerprint, checksums
_ORPHAN_JOIN_SECONDS = 2.0


@dataclasses.dataclass(frozen=True)
class RestoredState:
    """What `TrainCheckpointer.restore*` returns.

    Attributes:
      step: the saved step.
      trainable: the trainable half, with the template's structure (adapter nodes, None holes).
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


# ----------------------------------------------------------------------------- records
def _leaves_with_paths(tree) -> list[tuple[str, Any]]:
    return [(path_to_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _describe(leaves) -> list[dict]:
    return [{"path": p, "shape": [int(s) for s in np.shape(x)], "dtype": str(jnp.result_type(x))} for p, x in leaves]


def _jsonable(value):
    """`value` as plain JSON data (dataclasses, tuples, numpy scalars and index arrays)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "array") and isinstance(value.array, np.ndarray):  # StaticIndices
        return _jsonable(value.array)
    if isinstance(value, np.ndarray):
        return {"shape": list(value.shape), "sha256": hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def _node_config(node) -> dict:
    """The node's whole configuration (`node.config()`: method, path, layout, options, rank,
    dtypes, and for SVFT an `omega_sha256` of Ω) as plain JSON data, the form it is saved in."""
    return json.loads(json.dumps(_jsonable(node.config())))


def _target_configs(trainable) -> dict[str, dict]:
    return {path: _node_config(node) for path, node in leaves_by_path(trainable).items() if is_node(node)}


def _frozen_fingerprints(frozen) -> dict[str, dict]:
    """{target path: fingerprint} of what each adapter node's M is relative to.

    The base kernel's shape, dtype and SHA-256 (the format of `kernel_fingerprint`, shared
    with adapter files); for SVFT nodes made with keep_base=False, whose W0 is not stored,
    the SHA-256 of the factors U, s, V instead.
    """
    prints = {}
    for path, node in leaves_by_path(frozen).items():
        if not is_node(node):
            continue
        # An adapter set's mixing weights are relative to its frozen bank too.
        bank = node.bank_fingerprint() if hasattr(node, "bank_fingerprint") and node.bank is not None else {}
        base = getattr(node, "base", None)
        if base is not None:
            prints[path] = {**kernel_fingerprint(base), **bank}
            continue
        factors = [getattr(node, name, None) for name in ("u", "s", "v")]
        if any(f is None for f in factors):
            raise ValueError(f"frozen[{path!r}] holds neither its base kernel nor its factors; pass the frozen half of svft_jax.split(adapted) (or the whole adapted tree) as `frozen=`.")
        digest = hashlib.sha256()
        for f in factors:
            digest.update(np.ascontiguousarray(jax.device_get(f)).tobytes())
        prints[path] = {"factors_sha256": digest.hexdigest(), **bank}
    if not prints:
        raise ValueError("`frozen` has no adapter nodes; pass the frozen half of svft_jax.split(adapted) (or the whole adapted tree).")
    return prints


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


def _canonical(meta: dict) -> str:
    return json.dumps(meta, sort_keys=True, allow_nan=True, separators=(",", ":"))


def _meta_checksum(meta: dict) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in meta.items() if k != "sha256"}).encode()).hexdigest()


def _arrays_checksum(state: dict) -> str | None:
    """SHA-256 over the saved arrays (host bytes, in order); None when some are not on this host."""
    digest = hashlib.sha256()
    for name in sorted(state):
        for i, leaf in enumerate(jax.tree_util.tree_leaves(state[name])):
            if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
                return None  # multi-host shards: Orbax checks its own chunks
            array = np.ascontiguousarray(jax.device_get(leaf))
            digest.update(f"{name}/{i}|{array.dtype.str}|{array.shape}".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


def _io_error(err: BaseException, what: str) -> OSError | None:
    """The OSError that `err` stands for, or None if it is not an I/O failure.

    Orbax passes tensorstore's errors on as ValueError ("RESOURCE_EXHAUSTED: ... No space
    left on device [os_error_code='28']"); their errno is recovered from the message.
    """
    if isinstance(err, OSError):
        code = err.errno
    else:
        text = str(err)
        found = re.search(r"os_error_code='?(\d+)", text)
        if found:
            code = int(found.group(1))
        elif "No space left on device" in text or "RESOURCE_EXHAUSTED" in text:
            code = errno.ENOSPC
        else:
            return None
    reason = "the disk is full" if code == errno.ENOSPC else (os.strerror(code) if code else str(err))
    return OSError(code, f"{what}: {reason}. Earlier steps are untouched and the partial step is discarded ({type(err).__name__}: {err}).")


class TrainCheckpointer:
    """Save and resume adapter training with Orbax.

    Example:
      trainable, frozen = svft_jax.split(adapted)
      ckpt = TrainCheckpointer("runs/sst2/ckpt", max_to_keep=3, best_metric="accuracy", frozen=frozen)
      restored = ckpt.restore_latest(trainable, opt_state)      # None on a fresh run
      if restored is not None:
          start, trainable, opt_state = restored.step + 1, restored.trainable, restored.opt_state
      ...
      ckpt.save(step, trainable, opt_state, {"accuracy": acc}, rng=rng, data_position=step)
      ckpt.close()
    """

    def __init__(self, directory, *, max_to_keep: int | None = 3, best_metric: str | None = None,
                 best_mode: str = "max", keep_best: int = 1, async_save: bool = False,
                 frozen=None, read_only: bool = False):
        """Open (or create) a checkpoint directory.

        Args:
          directory: folder of step sub-directories; created if missing. A non-empty folder
            that was not created by TrainCheckpointer is refused (ValueError).
          max_to_keep: newest complete steps to keep (None keeps all).
          best_metric: name of a metric passed to `save`; the best `keep_best` steps by it are
            kept in addition to the newest ones, and `best_step()` reports the best. NaN and
            ±inf values rank worst.
          best_mode: "max" (accuracy) or "min" (loss).
          keep_best: how many best steps to keep (with `best_metric`).
          async_save: write in a background thread (`save` returns early; call
            `wait_until_finished` or `close`). The default waits, since the trainable
            state is small.
          frozen: the frozen half of `svft_jax.split(adapted)` (or the whole adapted tree).
            Its base kernels are fingerprinted once; every step records the fingerprints,
            and a restore into a model built on other base weights is refused. Without it
            only the adapter configuration and Ω are checked.
          read_only: open an existing directory without writing anything (no lock, no
            clean-up, `save` refused): for a read-only mount or another run's folder.
        Raises:
          ValueError: bad arguments, a foreign folder, or an unwritable one (read_only=False).
          OSError: another process is writing this directory (errno EBUSY).
        """
        if best_mode not in ("max", "min"):
            raise ValueError(f"`best_mode` must be 'max' or 'min', got {best_mode!r}.")
        if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
            raise ValueError(f"`max_to_keep` must be a positive int or None, got {max_to_keep!r}.")
        if not isinstance(keep_best, int) or keep_best < 1:
            raise ValueError(f"`keep_best` must be a positive int, got {keep_best!r}.")
        self.directory = Path(directory).absolute()
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.read_only = check_bool(read_only, "read_only", "TrainCheckpointer")
        self._async_save = check_bool(async_save, "async_save", "TrainCheckpointer")
        self._configuration = None  # the adapter configuration of this folder's steps, once checked
        self._base = None if frozen is None else _frozen_fingerprints(frozen)
        self._lock_fd = None
        self._manager = None
        # Only the primary process takes the lock and cleans up: in a multi-host run every
        # process opens the same folder, and Orbax writes each one's shards into it.
        self._primary = jax.process_index() == 0
        self._folder = CheckpointDirectory(self.directory, self._primary)
        if self.read_only:
            self._folder.check_readable()
        else:
            self._lock_fd = self._folder.claim()
            if self._lock_fd is not None:
                # weakref.finalize: an unclosed checkpointer still releases the lock when collected.
                self._release = weakref.finalize(self, os.close, self._lock_fd)
            self._folder.clean_up()

        keep: list = [policies.LatestN(max_to_keep)]
        best_fn = None
        if best_metric is not None:
            worst = -math.inf if best_mode == "max" else math.inf

            def best_fn(metrics, name=best_metric, worst=worst):
                # A diverged eval (NaN, inf) must never outrank a real one: NaN compares
                # false both ways, so sorting with it would pick an arbitrary "best".
                value = float(metrics[name])
                return value if math.isfinite(value) else worst

            # Steps saved without metrics are ranked by recency only (else BestN keeps them forever).
            keep.append(policies.BestN(get_metric_fn=best_fn, reverse=best_mode == "min", n=keep_best,
                                       keep_checkpoints_without_metrics=False))
        self._options = ocp.CheckpointManagerOptions(
            best_fn=best_fn, best_mode=best_mode,
            preservation_policy=None if self.read_only else policies.AnyPreservationPolicy(keep),
            keep_checkpoints_without_metrics=False,
            enable_async_checkpointing=self._async_save,
            cleanup_tmp_directories=not self.read_only,  # tmp dirs left by a killed save are never complete
            todelete_subdir=None if self.read_only else TRASH_DIR,
            read_only=self.read_only,
            create=not self.read_only,
        )
        self._manager = self._open_manager()

    def _open_manager(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(self.directory, options=self._options, item_names=("state", "meta"))

    # ----------------------------------------------------------------------------- queries
    def all_steps(self) -> list[int]:
        """Complete steps on disk, ascending."""
        return sorted(s for s, d in self._folder.step_dirs().items() if self._folder.is_complete(d))

    def latest_step(self) -> int | None:
        """The newest complete step, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The best complete step by `best_metric` (the latest one without a best metric).

        Non-finite metric values rank worst.
        """
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
            set). Steps saved without metrics compete for `max_to_keep` only. A non-finite
            `best_metric` is saved but ranked worst (with a CheckpointWarning).
          rng: a PRNG key (typed `jax.random.key` or raw uint32), or None.
          data_position: where the data stream is (an int or a JSON-able dict), or None.
          force: passed to Orbax (save even if its policy would skip the step).
        Raises:
          ValueError/TypeError for bad arguments, and ValueError for a step of another adapter
          configuration than the steps already in the folder (another method, pattern, options,
          targets, trainable leaves or base) — before anything is written; OSError with
          the directory named for I/O failures (disk full: errno ENOSPC; earlier steps are
          untouched and the same step can be saved again).
        """
        if self.read_only:
            raise ValueError(f"this TrainCheckpointer for {str(self.directory)!r} was opened with read_only=True; open it with read_only=False to save.")
        if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
            raise TypeError(f"`step` must be a non-negative int, got {step!r}.")
        step = int(step)
        force = check_bool(force, "force", "TrainCheckpointer.save")
        trainable_leaves = _leaves_with_paths(trainable)
        if not trainable_leaves:
            raise ValueError("`trainable` has no arrays; pass the first half of svft_jax.split(adapted).")
        targets = _target_configs(trainable)
        if self._base is not None and set(self._base) != set(targets):
            raise ValueError(f"`trainable` has adapter targets {sorted(targets)[:4]}, but `frozen` given to TrainCheckpointer has {sorted(self._base)[:4]}; pass the two halves of one svft_jax.split.")
        configuration = json.loads(_canonical({"targets": targets, "trainable": _describe(trainable_leaves), "base": self._base}))
        self._check_configuration(step, configuration)
        latest = self.latest_step()
        if latest is not None and step <= latest:
            raise ValueError(f"step {step} is not after the latest saved step {latest} in {str(self.directory)!r}; steps must increase (restore_latest to resume).")
        json_metrics = _json_metrics(metrics)
        if self.best_metric is not None and json_metrics is not None:
            if self.best_metric not in json_metrics:
                raise ValueError(f"best_metric={self.best_metric!r} is not in metrics {sorted(json_metrics or {})}; pass it to save() so retention can rank this step.")
            if not math.isfinite(json_metrics[self.best_metric]):
                warnings.warn(f"step {step}: metrics[{self.best_metric!r}] is {json_metrics[self.best_metric]}; the step is saved but ranked worst, so it never displaces the best step.", CheckpointWarning, stacklevel=2)
        try:
            json.dumps(data_position, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise TypeError(f"`data_position` must be an int or a JSON-serialisable dict, got {type(data_position).__name__}: {err}.") from err

        opt_leaves = _leaves_with_paths(opt_state) if opt_state is not None else []
        state: dict[str, Any] = {"trainable": [x for _, x in trainable_leaves]}
        if opt_leaves:
            state["opt_state"] = [x for _, x in opt_leaves]
        rng_info = None
        if rng is not None:
            typed = jnp.issubdtype(jnp.result_type(rng), jax.dtypes.prng_key)
            state["rng"] = jax.random.key_data(rng) if typed else jnp.asarray(rng)
            rng_info = {"typed": bool(typed), "impl": str(jax.random.key_impl(rng)) if typed else None}
        meta = {
            "format": CHECKPOINT_FORMAT, "version": STEP_VERSION, "step": step,
            "data_position": data_position, "metrics": json_metrics, "rng": rng_info,
            "trainable": _describe(trainable_leaves), "opt_state": _describe(opt_leaves) if opt_state is not None else None,
            "targets": targets, "base": self._base, "arrays_sha256": _arrays_checksum(state),
        }
        meta = json.loads(_canonical(meta))  # exactly what is written, so the checksum matches
        meta["sha256"] = _meta_checksum(meta)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        threads_before = set(threading.enumerate())
        try:
            saved = _orbax_save(self._manager, step, args, json_metrics, force)
            if not self._async_save:
                self._manager.wait_until_finished()
        except Exception as err:
            self._recover_from_failed_save(threads_before)
            io_error = _io_error(err, f"could not save checkpoint step {step} to {str(self.directory)!r}")
            if io_error is not None:
                raise io_error from err
            raise
        self._configuration = configuration
        if not self._async_save:
            self._folder.empty_trash()
        return bool(saved)

    def _check_configuration(self, step: int, configuration: dict) -> None:
        """Refuse a step whose adapter configuration differs from the steps already in the
        folder: a folder belongs to one run's adapter, and retention (`max_to_keep`) would
        otherwise delete another run's steps to make room for this one. Nothing is written.

        The folder's steps are read once (their metadata only); later saves of this
        checkpointer compare with the configuration it saved.
        """
        if self._configuration is not None:
            saved = [(self.latest_step(), self._configuration)]
        else:
            saved = []
            for existing in self.all_steps():
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", CheckpointWarning)  # version 1: checked by arrays only
                        meta = self._read_meta(existing, f"checkpoint step {existing} in {str(self.directory)!r}")
                except ValueError:
                    continue  # a damaged step can never be restored; retention may remove it
                saved.append((existing, {"targets": meta.get("targets") if meta["version"] >= 2 else None,
                                         "trainable": meta.get("trainable"), "base": meta.get("base")}))
        for existing, theirs in saved:
            differs = _configuration_differences(theirs, configuration)
            if differs:
                steps = self.all_steps()
                raise ValueError(
                    f"TrainCheckpointer.save: {str(self.directory)!r} holds the checkpoints of another adapter configuration "
                    f"(steps {steps}; step {existing} vs this step {step}: {differs}). Saving here would mix two runs in one "
                    f"folder, and retention (max_to_keep) would delete the other run's steps. Save this run to another "
                    f"directory, or resume that run (restore_latest with its own configuration). Nothing was written.")

    def _recover_from_failed_save(self, threads_before: set) -> None:
        """Start a fresh Orbax manager after a failed save, so saving the same step works.

        The failed step's tmp folder is removed (`_clean_up`); finished steps are not touched. When one item of a synchronous save fails, Orbax
        raises at once while the other items' commit threads may still be writing into that
        folder, and Orbax has no public call that waits for them. So wait (briefly, bounded)
        for the threads that this save started to end; idle long-lived ones (Orbax's event
        loop thread, started by the first save) merely use up the bound.
        """
        for cleanup in (self._manager.wait_until_finished, self._manager.close):
            with contextlib.suppress(Exception):  # the failure may resurface here
                cleanup()
        deadline = time.monotonic() + _ORPHAN_JOIN_SECONDS
        for thread in set(threading.enumerate()) - threads_before:
            if thread is not threading.current_thread() and not thread.daemon:
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self._folder.clean_up()
        self._manager = self._open_manager()

    def wait_until_finished(self) -> None:
        """Block until an asynchronous save has been committed.

        Raises:
          OSError for an I/O failure of that save (as `save`).
        """
        try:
            self._manager.wait_until_finished()
        except Exception as err:
            io_error = _io_error(err, f"could not save a checkpoint to {str(self.directory)!r}")
            if io_error is not None:
                raise io_error from err
            raise
        if not self.read_only:
            self._folder.empty_trash()

    def close(self) -> None:
        """Finish pending saves, release Orbax's resources and the writer lock."""
        try:
            if self._manager is not None:
                self.wait_until_finished()
                self._manager.close()
        finally:
            if self._lock_fd is not None:
                self._release()  # closes the fd: the kernel drops the flock
                self._lock_fd = None

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
          ValueError if the step is missing/incomplete, not ours, edited or damaged
          (checksums), or was saved for another adapter: other targets, configuration
          (pattern, options, rank, layout, dtypes), Ω, base weights (with `frozen=`), or
          other array paths, shapes or dtypes (optimiser) — naming the target and field.
        """
        if template_trainable is None:
            raise TypeError("restore needs `template_trainable`: the trainable half of svft_jax.split(svft_jax.apply(base_params, <same config>)); the checkpoint stores arrays, not the adapter structure.")
        if step not in self.all_steps():
            raise ValueError(f"no complete checkpoint for step {step} in {str(self.directory)!r}; complete steps: {self.all_steps()}.")
        where = f"checkpoint step {step} in {str(self.directory)!r}"
        meta = self._read_meta(step, where)

        trainable_leaves = _leaves_with_paths(template_trainable)
        if meta["version"] >= 2:
            _check_targets(meta["targets"], _target_configs(template_trainable), where)
            self._check_base(meta["base"], where)
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
        saved_digest = meta.get("arrays_sha256")
        if saved_digest is not None:
            digest = _arrays_checksum(state)
            if digest is not None and digest != saved_digest:
                raise ValueError(f"{where} is damaged: its arrays do not match the checksum recorded when it was saved. Restore an earlier step with restore(step, ...); complete steps: {self.all_steps()}.")

        trainable = _unflatten_like(template_trainable, state["trainable"])
        opt_state = _unflatten_like(template_opt_state, state.get("opt_state", [])) if template_opt_state is not None else None
        rng = None
        if meta["rng"] is not None:
            rng = state["rng"]
            if meta["rng"]["typed"]:
                rng = jax.random.wrap_key_data(rng, impl=meta["rng"]["impl"])
        return RestoredState(step=int(meta["step"]), trainable=trainable, opt_state=opt_state, rng=rng,
                             data_position=meta["data_position"], metrics=meta["metrics"])

    def _read_meta(self, step: int, where: str) -> dict:
        """The step's metadata, verified: ours, a known version, unedited, for this step."""
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as err:  # orbax raises many types for unreadable JSON
            raise ValueError(f"{where} is unreadable: {err}") from err
        if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{where} was not written by svft_jax TrainCheckpointer.")
        version = meta.get("version")
        if version not in (1, STEP_VERSION):
            raise ValueError(f"{where} has version {version!r}; this svft-jax reads versions 1 and {STEP_VERSION}.")
        if version == 1:
            warnings.warn(f"{where} was saved by an older svft-jax without checksums or adapter configuration; the template is checked by array shapes only.", CheckpointWarning, stacklevel=3)
        elif meta.get("sha256") != _meta_checksum(meta):
            raise ValueError(f"{where} is damaged or was edited: its metadata does not match the checksum recorded when it was saved. Restore another step; complete steps: {self.all_steps()}.")
        if meta.get("step") != step:
            raise ValueError(f"{where} records step {meta.get('step')!r}; the folder was renamed or edited. Restore another step; complete steps: {self.all_steps()}.")
        return meta

    def _check_base(self, saved: dict | None, where: str) -> None:
        if saved is None:
            if self._base is not None:
                warnings.warn(f"{where} was saved without `frozen=`, so its base model cannot be verified.", CheckpointWarning, stacklevel=4)
            return
        if self._base is None:
            raise ValueError(f"{where} records the base weights it was trained on; pass `frozen=` (the frozen half of svft_jax.split(adapted)) to TrainCheckpointer so the restore can check them.")
        for path, want in saved.items():
            have = self._base.get(path)
            unrecorded = sorted(set(have or {}) - set(want))
            if unrecorded:  # a step saved before these fields were recorded
                warnings.warn(f"{where} was saved without {unrecorded} of target {path!r}, so that part of what it was trained on cannot be verified.", CheckpointWarning, stacklevel=4)
                have = {k: v for k, v in have.items() if k in want}
            if have != want:
                fields = sorted(k for k in {*want, *(have or {})} if (have or {}).get(k) != want.get(k))
                if fields == ["bank_sha256"]:
                    raise ValueError(f"{where} holds mixing weights trained over another adapter bank: target {path!r} of the adapter set has the same base but a different bank (an adapter re-trained or replaced under the same name). The weights mean something only over the adapters they were trained with; rebuild the set from those adapters.")
                raise ValueError(f"{where} was trained on different base weights: target {path!r} differs in {fields} (checkpoint {_short(want)}, this model {_short(have)}). M is only meaningful with the singular vectors of the exact base weights; rebuild the template from the base model used for training.")


def _orbax_save(manager: ocp.CheckpointManager, step: int, args, metrics, force: bool):
    """The one call that writes a step (a seam: tests replace it to inject I/O failures)."""
    return manager.save(step, args=args, metrics=metrics, force=force)


def _short(value) -> str:
    if not isinstance(value, dict):
        return repr(value)
    return "{" + ", ".join(f"{k}: {str(v)[:12] if 'sha256' in k else v}" for k, v in sorted(value.items())) + "}"


def _differences(saved, have, prefix: str = "") -> list[str]:
    """Dotted names of the fields where two JSON values differ."""
    if isinstance(saved, dict) and isinstance(have, dict):
        out = []
        for key in sorted({*saved, *have}):
            out += _differences(saved.get(key), have.get(key), f"{prefix}{key}.")
        return out
    return [] if saved == have else [prefix.rstrip(".")]


def _check_targets(saved: dict, have: dict, where: str) -> None:
    only_saved, only_have = sorted(set(saved) - set(have)), sorted(set(have) - set(saved))
    if only_saved or only_have:
        raise ValueError(f"{where} was saved for other adapter targets (only in the checkpoint: {only_saved[:3]}; only in the template: {only_have[:3]}). Re-create the template with the targets used for training.")
    for path in saved:
        fields = _differences(saved[path], have[path])
        if fields:
            details = "; ".join(f"{name}: {_field(saved[path], name)} in the checkpoint, {_field(have[path], name)} in the template" for name in fields[:4])
            raise ValueError(f"{where} was saved for a differently configured adapter: target {path!r} differs in {fields} ({details}). Re-create the template with the configuration used for training (pattern, d/k, seed, rank, layout, dtypes, base model).")


def _configuration_differences(saved: dict, have: dict) -> str:
    """In words, how the adapter configuration of a saved step differs from a new one ('' if not)."""
    if saved["targets"] is not None:
        theirs, ours = saved["targets"], have["targets"]
        only_saved, only_have = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
        if only_saved or only_have:
            return f"other adapter targets (only in the folder: {only_saved[:3]}; only in this step: {only_have[:3]})"
        for path in sorted(theirs):
            fields = _differences(theirs[path], ours[path])
            if fields:
                details = "; ".join(f"{name}: {_field(theirs[path], name)} there, {_field(ours[path], name)} here" for name in fields[:3])
                return f"target {path!r} differs in {fields[:4]} ({details})"
    if saved["base"] is not None and have["base"] is not None and saved["base"] != have["base"]:
        path = next((p for p in sorted(saved["base"]) if saved["base"].get(p) != have["base"].get(p)), sorted(saved["base"])[0])
        return f"other base weights (target {path!r})"
    if saved["trainable"] != have["trainable"]:
        theirs = {d["path"]: d for d in saved["trainable"] or []}
        ours = {d["path"]: d for d in have["trainable"]}
        if set(theirs) != set(ours):
            return f"other trainable leaves (only in the folder: {sorted(set(theirs) - set(ours))[:3]}; only in this step: {sorted(set(ours) - set(theirs))[:3]})"
        path = next((p for p in ours if theirs[p] != ours[p]), next(iter(ours)))
        return f"trainable leaf {path!r} is {tuple(theirs[path]['shape'])} {theirs[path]['dtype']} there, {tuple(ours[path]['shape'])} {ours[path]['dtype']} here"
    return ""


def _field(config: dict, dotted: str):
    value = config
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return f"{value[:12]}…" if isinstance(value, str) and len(value) == 64 else repr(value)


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
