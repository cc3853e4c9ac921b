"""Launches a semppl_jax jaxline experiment.

    python experiments/launch.py --config=experiments/fashion_mnist.py
    python experiments/launch.py --config=experiments/fashion_mnist.py \
        --config.experiment_kwargs.config.objective=relic --config.training_steps=200

The config's ``experiment_class`` picks the experiment: ``'pretrain'`` (SemPPL pre-training,
semppl_jax.jaxline.experiment) or ``'eval'`` (fine-tune / linear / kNN evaluation,
semppl_jax.jaxline.eval_experiment). Checkpoints go to ``<checkpoint_dir>/checkpoints`` through Orbax; a
restarted run resumes from the latest one. Multi-host: pass --coordinator_address, --num_processes
and --process_id on every host, or --distributed_auto on a TPU slice / under SLURM or Open MPI
(jax detects the cluster). The --*_timeout_s flags bound how long the healthy processes wait for a
lost one before they exit with an error. Only process 0 writes TensorBoard events.

One run per directory: process 0 holds an OS lock on ``<checkpoint_dir>/run.lock`` (taken
before anything is written there, released by the kernel however the process ends); a second
launch on the same directory exits at once naming the holder's pid and host. Bucket URLs
(``gs://``) are not locked: make sure one run writes there.

Preemption: SIGTERM or SIGINT stops training after the current step (every process at the same
step), saves that step's checkpoint and exits with code 75; relaunching the same command
resumes with no step lost. A second signal exits at once without saving.

Config-checked resume: every checkpoint stores the resolved config and the package version;
resuming with another value of a run-defining field (semppl_jax/jaxline/run_config.py) is
refused with one line per field, saved -> now; --allow_config_change=<field>,... accepts it.

Exit codes: 0 done; 1 an error (traceback); 73 another run holds the directory; 75 stopped by
SIGTERM / SIGINT after saving a checkpoint (relaunch to resume); 78 resume refused, the config
differs from the checkpoint's.
"""
import functools
import os
import sys
import warnings

from absl import app
from absl import flags
from absl import logging

# TensorFlow (tf.data only) would print C++ INFO lines to the console before any flag is read.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Importable without `pip install -e .` too (run from a checkout).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from semppl_jax.jaxline import compat as jaxline_compat  # pylint: disable=g-import-not-at-top

jaxline_compat.install()

import jax  # pylint: disable=g-import-not-at-top
from jaxline import platform  # pylint: disable=g-import-not-at-top

from semppl_jax import checkpointing  # pylint: disable=g-import-not-at-top
from semppl_jax import parallel  # pylint: disable=g-import-not-at-top
from semppl_jax.checkpointing import run_lock  # pylint: disable=g-import-not-at-top
from semppl_jax.jaxline import mesh_experiment  # pylint: disable=g-import-not-at-top
from semppl_jax.jaxline import run_config  # pylint: disable=g-import-not-at-top

EXIT_LOCKED = 73     # EX_CANTCREAT: another run holds the run directory.
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal after saving; relaunch to resume.
EXIT_CONFIG_CHANGED = 78  # EX_CONFIG: resuming with another run-defining config refused.

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "host:port of process 0, for multi-host runs without auto-detection.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Number of processes (hosts).")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This process's index in [0, num_processes).")
_DISTRIBUTED_AUTO = flags.DEFINE_bool(
    "distributed_auto", False,
    "Initialise jax.distributed with cluster auto-detection (Cloud TPU slice, SLURM, Open MPI).")
_INIT_TIMEOUT = flags.DEFINE_integer(
    "initialization_timeout_s", 300, "Seconds to wait for every process to connect at start-up.")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout_s", 60,
    "Seconds without a heartbeat after which a process counts as lost; the others then exit "
    "with an error instead of waiting forever in a collective.")
_SHUTDOWN_TIMEOUT = flags.DEFINE_integer(
    "shutdown_timeout_s", 120, "Seconds a finished process waits at exit for the others.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_list(
    "allow_config_change", [],
    "Run-defining config fields (as the refusal names them, e.g. training_steps or "
    "experiment_kwargs.config.queue.size; 'all' for every one) allowed to differ from the "
    "checkpoint's when resuming. Without it a resume with another config is refused.")


def checkpointer_factory(config, mode):
  """Orbax checkpoints under <checkpoint_dir>/checkpoints (a path or gs://...), last N kept."""
  del mode
  root = config.checkpoint_dir
  # A bucket URL (gs://...) is used as it is; Orbax and TensorBoard write there natively.
  directory = os.path.join(root if "://" in root else os.path.abspath(root), "checkpoints")
  # Every checkpoint stores the resolved config; a resume with another one is refused.
  metadata = run_config.run_metadata(config)
  check = functools.partial(run_config.check_resume, current=metadata,
                            allowed=_ALLOW_CONFIG_CHANGE.value)
  checkpointer = checkpointing.OrbaxCheckpointer(
      directory, max_to_keep=config.max_checkpoints_to_keep, run_metadata=metadata,
      check_resume=check)
  checkpointer.check_resume("latest")  # Refuses before the experiment is built.
  return checkpointer


def experiment_class_for(name):
  if name == "pretrain":
    from semppl_jax.jaxline import experiment  # pylint: disable=g-import-not-at-top
    return experiment.Experiment
  if name == "eval":
    from semppl_jax.jaxline import eval_experiment  # pylint: disable=g-import-not-at-top
    return eval_experiment.EvalExperiment
  raise ValueError(f"config.experiment_class: got {name!r}, allowed: 'pretrain', 'eval'.")


def initialize_distributed():
  """jax.distributed from the flags; non-zero processes get no TensorBoard writer."""
  timeouts = dict(initialization_timeout_s=_INIT_TIMEOUT.value,
                  heartbeat_timeout_s=_HEARTBEAT_TIMEOUT.value,
                  shutdown_timeout_s=_SHUTDOWN_TIMEOUT.value)
  if _DISTRIBUTED_AUTO.value:
    parallel.initialize_distributed(**timeouts)
  elif _NUM_PROCESSES.value > 1 or _COORDINATOR.value:
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                    **timeouts)
  if jax.process_index() != 0:
    # jaxline builds a writer on every host; one event stream per run is written by process 0.
    platform.create_writer = lambda config, mode: None


def route_library_logs(config) -> str:
  """Library INFO logs (jaxline's config dump, Orbax, TensorFlow) go to a file in the run
  directory; the console keeps progress lines, results and warnings. ``--verbosity=0`` (or any
  explicit ``--verbosity``) keeps absl's usual console logging instead."""
  if flags.FLAGS["verbosity"].present or flags.FLAGS["logtostderr"].value:
    return ""
  root = config.checkpoint_dir
  # Logs stay on local disk, also when checkpoints go to a bucket.
  log_dir = os.path.join(os.path.abspath("logs") if "://" in root else os.path.abspath(root),
                         "logs")
  os.makedirs(log_dir, exist_ok=True)
  # Named before jax.distributed starts (its own start-up lines go to the file too).
  name = f"pid{os.getpid()}" if _DISTRIBUTED_AUTO.value else f"process{_PROCESS_ID.value}"
  logging.get_absl_handler().use_absl_log_file(name, log_dir)
  flags.FLAGS.stderrthreshold = "warning"
  warnings.simplefilter("ignore", DeprecationWarning)  # Third-party deprecations: log noise.
  return os.path.join(log_dir, f"{name}.INFO")


def lock_run_directory(config):
  """The run directory's lock (held until the process ends), or exit ``EXIT_LOCKED``."""
  try:
    lock = run_lock.lock_run_directory(config.checkpoint_dir)
  except run_lock.RunDirectoryLocked as e:
    print(f"[setup] {e}", file=sys.stderr, flush=True)
    sys.exit(EXIT_LOCKED)
  except checkpointing.CheckpointError as e:  # A file in the way, no permission ...
    print(f"[setup] {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  if lock is None:
    print(f"[setup] {config.checkpoint_dir} is a bucket URL, which cannot be locked: make sure "
          "no other run writes there", file=sys.stderr, flush=True)
  return lock


def main(argv):
  config = flags.FLAGS.config
  # Process 0 locks the run directory before anything is written there (with
  # --distributed_auto its index is known only once jax.distributed has started).
  lock = None
  if not _DISTRIBUTED_AUTO.value and _PROCESS_ID.value == 0:
    lock = lock_run_directory(config)
  mesh_experiment.PREEMPTION.install()
  log_file = route_library_logs(config)
  initialize_distributed()
  if _DISTRIBUTED_AUTO.value and jax.process_index() == 0:
    lock = lock_run_directory(config)
  if log_file and jax.process_index() == 0:
    print(f"[setup] library logs: {log_file} (--verbosity=0 shows them here)", flush=True)
  try:
    platform.main(experiment_class_for(config.experiment_class), argv,
                  checkpointer_factory=checkpointer_factory)
  except checkpointing.ResumeRefused as e:
    print(f"[setup] {e}", file=sys.stderr, flush=True)
    sys.exit(EXIT_CONFIG_CHANGED)
  preemption = mesh_experiment.PREEMPTION
  if preemption.requested() and preemption.stopped_at is not None:
    mesh_experiment.say(
        f"[preempt] stopped by {preemption.signal_name()} at step {preemption.stopped_at}; its "
        f"checkpoint is saved in {config.checkpoint_dir}; relaunch the same command to resume "
        f"(exit code {EXIT_PREEMPTED})")
    sys.exit(EXIT_PREEMPTED)
  del lock  # Held to here; the kernel releases it at exit.


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
