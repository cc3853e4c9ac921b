"""Launches a semppl_jax jaxline experiment.

    python experiments/launch.py --config=experiments/fashion_mnist.py
    python experiments/launch.py --config=experiments/fashion_mnist.py \
        --config.experiment_kwargs.config.objective=relic --config.training_steps=200
    semppl-train --config=fashion_mnist:smoke     # installed: a shipped config by name
    semppl-eval --config=eval_fashion_mnist --print_config

``--config`` takes a config file (``path.py``, optionally ``path.py:preset``) or the name of a
config shipped in this directory (``fashion_mnist``, ``eval_fashion_mnist``, ...). Step-count
fields longer than ``training_steps`` are clamped to it (one ``[setup]`` line says which). A bad
config value stops the launch before anything loads, with one line naming the flag that fixes
it and exit status 2 (``--verbosity=1`` shows the traceback); ``--print_config`` prints the
resolved config and exits.

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
import re
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

from experiments import launch_config  # pylint: disable=g-import-not-at-top
from semppl_jax import checkpointing  # pylint: disable=g-import-not-at-top
from semppl_jax import parallel  # pylint: disable=g-import-not-at-top
from semppl_jax.checkpointing import run_lock  # pylint: disable=g-import-not-at-top
from semppl_jax.jaxline import experiment_config  # pylint: disable=g-import-not-at-top
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
_WRITER = flags.DEFINE_enum(
    "writer", "tensorboard", ["tensorboard", "wandb"],
    "Where scalars and images go: TensorBoard event files under <checkpoint_dir>/train, or "
    "Weights & Biases (pip install 'semppl_jax[wandb]'; WANDB_MODE=offline works without "
    "network).")
_WANDB_PROJECT = flags.DEFINE_string("wandb_project", "semppl_jax", "W&B project (--writer=wandb).")
_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False, "Print the resolved config (overrides applied, step counts fitted "
    "to training_steps) and exit without running.")
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
  # Asynchronous saves: jaxline's final save is followed by wait_for_checkpointing_to_finish
  # (also after a SIGTERM), each save first waits for the one before, and a run that fails
  # still finishes its save in flight before the process (and its run lock) ends.
  checkpointer = checkpointing.OrbaxCheckpointer(
      directory, max_to_keep=config.max_checkpoints_to_keep,
      save_async=config.save_checkpoint_async, run_metadata=metadata, check_resume=check)
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
  _console_only_our_warnings()
  warnings.simplefilter("ignore", DeprecationWarning)  # Third-party deprecations: log noise.
  return os.path.join(log_dir, f"{name}.INFO")


# --- config errors: one line naming the flag, exit status 2 -----------------------------------

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))
# Fields of the launch config itself (jaxline's); every other "config.<field>" named by a check
# is a field of experiment_kwargs.config.
_LAUNCH_FIELDS = ("experiment_class", "training_steps", "checkpoint_dir", "random_seed")


class ConfigError(Exception):
  """A bad config or flag, reported as one line (no traceback) with exit status 2."""


def shipped_configs():
  """Names of the configs next to this file that ``--config=<name>`` accepts."""
  return sorted(f[:-3] for f in os.listdir(CONFIG_DIR)
                if f.endswith(".py") and not f.startswith(("_", "launch", "bench", "label",
                                                           "study", "commands")))


def resolve_config_arg(argv):
  """``--config=<name>[:preset]`` -> the shipped config file's path (argv rewritten in place),
  so an installed ``semppl-train --config=fashion_mnist`` works from any directory. A value
  that names an existing file, or contains ``/`` or ``.py``, is left as it is."""
  for i, arg in enumerate(argv):
    m = re.fullmatch(r"(--?config)=([^:]+)(:.*)?", arg)
    if not m:
      continue
    name, preset = m.group(2), m.group(3) or ""
    if "/" in name or name.endswith(".py") or os.path.isfile(name):
      return argv
    path = os.path.join(CONFIG_DIR, name + ".py")
    if not os.path.exists(path):
      raise ConfigError(f"--config={name}: no such config file, and not a shipped config "
                        f"({', '.join(shipped_configs())}).")
    argv[i] = f"{m.group(1)}={path}{preset}"
    return argv
  return argv


def flag_for(field: str) -> str:
  """The command-line flag that sets ``field`` (dotted, as a config check names it)."""
  if field.split(".")[0] in _LAUNCH_FIELDS:
    return f"--config.{field}"
  return f"--config.experiment_kwargs.config.{field}"


def config_error_line(error: BaseException):
  """The message of a config check's ``ValueError('config.<field>: ...')`` with the field
  written as the flag that sets it; None for any other error. A one-line check stays one
  line; a message with a list below its first line (a checkpoint that does not match the
  config) keeps the list on the lines after it."""
  first, _, rest = str(error).strip().partition("\n")
  text = " ".join(first.split())
  m = re.match(r"config\.([A-Za-z_][\w.]*): (.*)", text)
  if m:
    line = f"{flag_for(m.group(1))}: {m.group(2)}"
  else:
    m = re.match(r"config is missing the field\(s\) ([\w., ]+?); (.*)", text)
    if not m:
      return None
    names = ", ".join(flag_for(f.strip()) for f in m.group(1).split(","))
    line = f"the config lacks {names}; {m.group(2)}"
  return f"{line}\n{rest}" if rest.strip() else line


def _unknown_field(error: KeyError, argv) -> ConfigError:
  """An override of a field the config does not have, named by its flag."""
  key = str(error.args[0] if error.args else error).split("\n")[0].strip("'\"")
  bad = [a.split("=")[0] for a in argv
         if a.startswith("--config.") and key in a.split("=")[0].split(".")]
  return ConfigError(f"{bad[0] if bad else '--config'}: the config has no field {key!r} "
                     "(--print_config lists the fields; the experiment's own fields are under "
                     "--config.experiment_kwargs.config.)")


def load_config():
  """``FLAGS.config`` (loaded lazily by ml_collections), with its load and override errors as
  :class:`ConfigError` naming the flag."""
  try:
    return flags.FLAGS.config
  except KeyError as e:
    raise _unknown_field(e, sys.argv) from e
  except (OSError, AttributeError, TypeError, ValueError) as e:
    first = " ".join(str(e).split())
    raise ConfigError(f"--config: {first}") from e


def parse_flags(argv):
  """absl's flag parsing, with an override of an unknown config field (a KeyError inside
  ml_collections) as one line and exit status 2 instead of a traceback."""
  try:
    return app.parse_flags_with_usage(argv)
  except KeyError as e:
    if "--verbosity" in " ".join(argv):
      raise
    print(f"error: {_unknown_field(e, argv)}", file=sys.stderr, flush=True)
    sys.exit(2)


def verbose() -> bool:
  """Tracebacks wanted: ``--verbosity`` above 0."""
  return flags.FLAGS["verbosity"].present and flags.FLAGS.verbosity > 0


_OUR_CODE = (os.sep + "semppl_jax" + os.sep, os.path.dirname(os.path.abspath(__file__)) + os.sep)


def _console_only_our_warnings():
  """Warnings of this package (a skipped corrupt checkpoint or image) still reach the console;
  those of the libraries (Orbax, jaxline, TensorFlow) go to the log file only. Errors always
  reach the console."""
  handler = logging.get_absl_handler().python_handler
  to_stderr = handler._log_to_stderr  # pylint: disable=protected-access

  def log_to_stderr(record):
    if record.levelno >= logging.converter.STANDARD_ERROR or any(
        part in (record.pathname or "") for part in _OUR_CODE):
      to_stderr(record)

  handler._log_to_stderr = log_to_stderr  # pylint: disable=protected-access


def say_next_steps(config) -> None:
  """The end of a pre-training run: where its checkpoint is and the commands that use it."""
  root = config.checkpoint_dir
  run_dir = root if "://" in root else os.path.abspath(root)
  c = config.experiment_kwargs.config
  installed = os.path.basename(sys.argv[0]).startswith("semppl")
  train = "semppl-train" if installed else "python experiments/launch.py"
  evaluate = ("semppl-eval --config=eval_fashion_mnist" if installed else
              "python experiments/launch.py --config=experiments/eval_fashion_mnist.py")
  label = "semppl-label" if installed else "python experiments/label.py"
  data = ("--dataset=fashion_mnist" if c.data.dataset == "fashion_mnist" else
          "--labelled_dir=my/labelled --unlabelled_dir=my/unlabelled")
  print(f"[done] checkpoint: {run_dir}/checkpoints/latest (rerunning the same command resumes "
        f"or re-evaluates it: {train} ... --config.checkpoint_dir={root})", flush=True)
  print(f"[next] evaluate: {evaluate} "
        f"--config.experiment_kwargs.config.checkpoint.path={run_dir}/checkpoints "
        "--config.experiment_kwargs.config.protocol=knn   (or fine_tune, linear)", flush=True)
  print(f"[next] label images: {label} --checkpoint={run_dir} {data}", flush=True)
  print(f"[next] curves: tensorboard --logdir {run_dir}   (PNGs: {run_dir}/plots)", flush=True)


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
  try:
    config = load_config()
    note = launch_config.fit_to_training_steps(config)
    if _PRINT_CONFIG.value:
      print(config)
      return 0
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
    experiment_class = experiment_class_for(config.experiment_class)
    # Check the config before jaxline starts: nothing is created or compiled for a bad one.
    validate = (experiment_config.validate_pretrain_config
                if config.experiment_class == "pretrain" else
                experiment_config.validate_eval_config)
    validate(config.experiment_kwargs.config, num_devices=jax.device_count(),
             num_processes=jax.process_count())
    if jax.process_index() == 0:
      if note:
        print(note, flush=True)
      if log_file:
        print(f"[setup] library logs: {log_file} (--verbosity=0 shows them here)", flush=True)
    # TensorBoard tags grouped as train/, monitor/, eval/, final/ (monitoring.tensorboard_tag).
    from semppl_jax.jaxline import monitoring  # pylint: disable=g-import-not-at-top
    if _WRITER.value == "wandb" and jax.process_index() == 0:
      platform.create_writer = monitoring.wandb_writer_factory(_WANDB_PROJECT.value)
    platform.create_writer = monitoring.grouped_writer_factory(platform.create_writer)
    try:
      platform.main(experiment_class, argv, checkpointer_factory=checkpointer_factory)
    except checkpointing.ResumeRefused as e:
      print(f"[setup] {e}", file=sys.stderr, flush=True)
      sys.exit(EXIT_CONFIG_CHANGED)
    preemption = mesh_experiment.PREEMPTION
    if preemption.requested() and preemption.stopped_at is not None:
      mesh_experiment.say(
          f"[preempt] stopped by {preemption.signal_name()} at step {preemption.stopped_at}; "
          f"its checkpoint is saved in {config.checkpoint_dir}; relaunch the same command to "
          f"resume (exit code {EXIT_PREEMPTED})")
      sys.exit(EXIT_PREEMPTED)
    if jax.process_index() == 0 and config.experiment_class == "pretrain":
      say_next_steps(config)
    del lock  # Held to here; the kernel releases it at exit.
  except (ConfigError, ValueError) as e:
    line = str(e) if isinstance(e, ConfigError) else config_error_line(e)
    if line is None or verbose():
      raise
    print(f"error: {line}", file=sys.stderr, flush=True)
    return 2
  return 0


def run(default_config: str = "fashion_mnist"):
  """Console-script entry (``semppl-train``): ``--config`` defaults to ``default_config``."""
  argv = list(sys.argv)
  if not any(re.match(r"--?config(=|$)", a) for a in argv[1:]):
    argv.insert(1, f"--config={default_config}")
  _run(argv)


def _run(argv):
  try:
    sys.argv[:] = resolve_config_arg(argv)  # config_flags reads sys.argv itself.
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  app.run(main, flags_parser=parse_flags)  # Exits with main's return value.


def run_eval():
  """Console-script entry (``semppl-eval``): ``--config`` defaults to eval_fashion_mnist."""
  run("eval_fashion_mnist")


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  _run(list(sys.argv))
