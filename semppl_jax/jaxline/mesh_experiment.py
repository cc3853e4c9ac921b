"""jaxline plumbing shared by the pre-training and evaluation experiments, without pmap.

jaxline's default loop replicates with ``pmap``; this base runs one ``jax.jit`` per step over a
``Mesh`` instead, keeps the step's metrics on device (fetched only when a line is printed), and
prints progress and results on process 0 only.

Preemption: :data:`PREEMPTION` (installed by the launcher) turns SIGTERM / SIGINT into a
request to stop; the loop then ends after the current step, on every process at the same step,
and jaxline's final save writes the checkpoint of that step. A second signal ends the process at
once.
"""
import collections
import os
import signal
import time
from typing import Any, Callable, Deque, Dict, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jaxline import experiment as jaxline_experiment

PyTree = Any


def format_duration(seconds: float) -> str:
  """Seconds as '12m05s' or '3h07m' (progress lines)."""
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else (
      f"{seconds // 60}m{seconds % 60:02d}s")


def as_int(global_step: Any) -> int:
  """jaxline's step (an int, or a per-device array) as an int."""
  return int(np.asarray(global_step).reshape(-1)[0])


def is_main_process() -> bool:
  """Only process 0 prints and writes summaries."""
  return jax.process_index() == 0


def say(message: str) -> None:
  """Prints ``message`` on process 0 only."""
  if is_main_process():
    print(message, flush=True)


class Preemption:
  """SIGTERM / SIGINT as a request to stop training after the current step.

  ``install()`` replaces the handlers of both signals: the first one sets :attr:`signum` and
  prints one line; a second one restores the default action and re-sends itself (the process
  ends at once, without a final checkpoint). The training loop polls :meth:`requested`.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum = None      # The first signal received, or None.
    self.stopped_at = None  # The global step the loop stopped at, or None.
    self._previous = {}

  def install(self) -> None:
    """Installs the handlers (main thread only; idempotent)."""
    for signum in self.SIGNALS:
      if signum not in self._previous:
        self._previous[signum] = signal.signal(signum, self._handle)

  def uninstall(self) -> None:
    """Puts the previous handlers back."""
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signum is not None:
      # Second signal: give up the graceful stop.
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
      return
    self.signum = signum
    # os.write, not print: a handler may interrupt a print of the main thread.
    os.write(2, f"[preempt] {signal.Signals(signum).name} received: stopping after the current "
                "step and saving its checkpoint (send it again to exit at once, unsaved)\n"
                .encode())

  def signal_name(self) -> str:
    """'SIGTERM' / 'SIGINT' (the first signal received), or '' if none."""
    return signal.Signals(self.signum).name if self.signum is not None else ""

  def requested(self) -> bool:
    """Whether a stop signal arrived in this process."""
    return self.signum is not None


PREEMPTION = Preemption()


def _stop_agreed(local: bool, num_processes: int) -> bool:
  """Whether any process asked to stop (a collective: every process must call it)."""
  if num_processes == 1:
    return local
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flags = multihost_utils.process_allgather(np.asarray(local, np.int32))
  return bool(np.any(flags))


class MeshExperiment(jaxline_experiment.AbstractExperiment):
  """Base of both experiments: checkpointed state, pmap-free loop, console.

  Subclasses set ``self.config`` (with ``log_every_steps``), ``self._mesh`` and
  ``self._train_state``, and implement ``_state_tree()`` / ``_place(tree)`` (state <-> the
  checkpointed pytree), ``step``, ``evaluate``, ``_progress(scalars) -> str`` and
  ``_report(results)``. Step keys are ``fold_in(root, step)``, so jaxline's rng is not used.
  """

  CHECKPOINT_ATTRS = {}
  NON_BROADCAST_CHECKPOINT_ATTRS = {"_train_state": "train_state"}
  _PROGRESS_PREFIX = "train"

  def __init__(self, mode: str, init_rng: jax.Array):
    super().__init__(mode=mode, init_rng=init_rng)
    # Device metrics of the last logging window (averaged into the final report).
    self._recent: Deque[Dict[str, jax.Array]] = collections.deque(maxlen=1)

  # --- public state and loop ----------------------------------------------------------------------

  @property
  def train_state(self) -> PyTree:
    """The current train state, on the devices (the pre-training experiment's is a
    ``semppl_jax.train.TrainState``; the evaluation experiment's a dict). Assigning places the
    new value as a restored checkpoint would be (same shardings)."""
    return self._train_state

  @train_state.setter
  def train_state(self, value: PyTree) -> None:
    self._train_state = self._place(value)

  def run(self, steps: int,
          on_log: Optional[Callable[[int, Dict[str, float]], Any]] = None, *,
          start: int = 0, log_every: Optional[int] = None) -> Dict[str, float]:
    """Trains steps ``start, ..., steps - 1`` in this process, without jaxline.

    No checkpoint is written and nothing is printed (scripts do that in ``on_log``; the
    launcher's loop is :meth:`train_loop`). Every ``log_every`` steps (default:
    ``config.log_every_steps``) and after the last step, the mean of each step metric since the
    previous call is fetched to the host, the same way the launcher's loop fetches (nothing in
    between), and ``on_log(done, means)`` is called with the number of steps done.

    Returns:
      The last ``means`` (``{}`` when no step ran).

    Raises:
      FloatingPointError: a step was refused as non-finite (checked at each log step).
    """
    from semppl_jax.jaxline import summaries  # pylint: disable=g-import-not-at-top
    log_every = max(1, log_every or self.config.log_every_steps)
    window, means = [], {}
    for step in range(start, steps):
      window.append(self.step(global_step=step, rng=None))
      done = step + 1
      if done % log_every == 0 or done == steps:
        self._check_finite()
        with jax.transfer_guard_device_to_host("allow"):
          means = summaries.window_means(window)
        window = []
        if on_log is not None:
          on_log(done, means)
    return means

  # --- checkpointing -----------------------------------------------------------------------------

  def _state_tree(self) -> PyTree:
    return self._train_state

  def _place(self, tree: PyTree) -> Any:
    return tree

  def snapshot_state(self) -> Mapping[str, Any]:
    """``{'train_state': pytree}``, for the checkpointer.

    Raises:
      FloatingPointError: the state stopped updating at a non-finite step
        (:meth:`_check_finite`); nothing is saved.
    """
    self._check_finite()
    # Copies: the checkpointer may read the arrays after the next step has been dispatched, and
    # that step donates (reuses) the state's buffers; on CPU a host view of a buffer is no copy.
    copy = lambda x: jnp.copy(x) if isinstance(x, jax.Array) else x
    return {"train_state": jax.tree_util.tree_map(copy, self._state_tree())}

  def _check_finite(self) -> None:
    """Raises ``FloatingPointError('step N: non-finite <check> ...')`` if a step was refused as
    non-finite; called at every progress line and before every checkpoint save. Subclasses
    with a guarded state override it (the default checks nothing)."""

  def restore_from_snapshot(self, snapshot_state: Mapping[str, Any]) -> None:
    """Puts a restored ``snapshot_state()`` tree back, placed with the state's shardings."""
    self._train_state = self._place(snapshot_state["train_state"])

  def initialize_train_step_rng(self, rng: jax.Array) -> jax.Array:
    """Returns ``rng`` unchanged (jaxline's default splits it per device with pmap)."""
    return rng

  # --- loop --------------------------------------------------------------------------------------

  def _evaluate_at_end(self) -> bool:
    return True

  def _remember(self, metrics: Dict[str, jax.Array]) -> None:
    if self._recent.maxlen != max(1, self.config.log_every_steps):
      self._recent = collections.deque(self._recent, maxlen=max(1, self.config.log_every_steps))
    self._recent.append(metrics)

  def recent_mean(self, key: str) -> float:
    """Mean of a step metric over the last logging window (NaN if never reported)."""
    values = [m[key] for m in self._recent if key in m]
    return float(np.mean(jax.device_get(values))) if values else float("nan")

  # Hooks of the loop (no-ops here; the pre-training experiment adds periodic evaluation,
  # image summaries and plots). Called on every process.

  def _begin_run(self, config, start_step: int) -> None:
    """Before the first step of this launch (``config``: the jaxline config)."""

  def _after_step(self, done: int, writer) -> None:
    """After step ``done - 1`` and its progress line."""

  def _end_run(self, done: int, writer) -> None:
    """After the final evaluation."""

  def _should_stop(self, done: int, log_every: int) -> bool:
    """Whether to stop after step ``done - 1`` for a signal (:data:`PREEMPTION`).

    One process: checked after every step. Several: agreed by a small all-gather at the
    progress-line steps (every ``log_every``), so that every process stops at the same step
    without a host round trip per step.
    """
    processes = jax.process_count()
    if processes > 1 and done % log_every:
      return False
    return _stop_agreed(PREEMPTION.requested(), processes)

  def train_loop(self, config, state, periodic_actions, writer=None):
    """jaxline's loop without its pmap: integer steps, a progress line (steps/s, ETA) every
    ``log_every_steps``, evaluation at the end (also when no step is left to run).

    On SIGTERM / SIGINT (:data:`PREEMPTION`) the loop ends after the current step, without
    evaluating; jaxline's final save then checkpoints that step.
    """
    start_step = int(state.global_step)
    total = config.training_steps
    log_every = max(1, self.config.log_every_steps)
    self._begin_run(config, start_step)
    t0 = time.time()
    while self.should_run_step(int(state.global_step), config):
      if self._should_stop(int(state.global_step), log_every):
        PREEMPTION.stopped_at = int(state.global_step)
        self._check_finite()  # Never stops "successfully" on a refused (non-finite) step.
        say(f"[preempt] stopped at step {PREEMPTION.stopped_at}/{total}; saving its checkpoint")
        return
      step = int(state.global_step)
      metrics = self.step(global_step=step, rng=None, writer=writer)
      state.global_step = step + 1
      for action in periodic_actions:
        action(time.time(), state.global_step, metrics)
      done = step + 1
      if done == start_step + 1:  # Rates exclude the first step, which compiles.
        t0 = time.time()
      if done % log_every == 0 or done == total or done == start_step + 1:
        self._check_finite()  # Stops here rather than training on from a refused step.
        if done == start_step + 1:
          speed = "compiled"
        else:
          rate = (done - start_step - 1) / max(time.time() - t0, 1e-9)
          speed = f"{rate:.2f} steps/s | ETA {format_duration((total - done) / rate)}"
        # The only host fetch of the step's metrics: at the log interval (allowed explicitly,
        # so a run under jax.transfer_guard_device_to_host('disallow') fetches nothing else).
        with jax.transfer_guard_device_to_host("allow"):
          scalars = jax.device_get(metrics)
        say(f"[{self._PROGRESS_PREFIX}] step {done}/{total} | {speed} | "
            f"{self._progress(scalars)}")
      self._after_step(done, writer)
    if self._evaluate_at_end():
      results = self.evaluate(global_step=state.global_step, rng=None, writer=writer)
      if writer is not None and is_main_process():
        writer.write_scalars(int(state.global_step), results)
      if is_main_process():
        self._report(results)
    self._end_run(int(state.global_step), writer)
