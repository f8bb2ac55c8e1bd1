"""One exception family. Every command catches `GptjaxError` once, prints its one line and exits with the
error's `exit_code`; anything else reaching a command is a bug and keeps its traceback.

  GptjaxError            what the user can fix; the message says how          exit 2
    ConfigError          a config, preset or override                          (config.py)
    DataError            a corpus, token cache or tokenizer                    (data/)
      PreparationInterrupted  SIGTERM while preparing; nothing half-built kept  exit 143
    CheckpointError      a run directory or checkpoint                         (checkpoint.py)
    RunDirBusy           another live process is training into the run dir     (train/)
    TaskError            an evaluation task file or name                       (eval/)
    GenerationError      a sampling request                                    (generate.py)
    ConversionError      a Hugging Face import or export                       (hf.py)
    SweepError           a scaling-law sweep                                   (scaling/)
    HarnessError         the lm-evaluation-harness adapter                     (eval/harness.py)
    NonFiniteLoss        training diverged; the last good checkpoint is kept   exit 1
    Preempted            SIGTERM: a checkpoint was saved, rerun to resume      exit 143

The user-error classes also derive from ValueError, as they did before there was one family.
"""

from __future__ import annotations

import sys


class GptjaxError(Exception):
    """Something the user can fix; the message says how."""

    exit_code = 2
    prefix = "error: "


class ConfigError(GptjaxError, ValueError):
    """A configuration the user wrote cannot be used; the message says how to fix it."""


class DataError(GptjaxError, ValueError):
    """The corpus, cache or tokenizer cannot be used; the message says how to fix it."""


class CheckpointError(GptjaxError, ValueError):
    """A checkpoint or run directory cannot be used as asked; the message says what to do."""


class RunDirBusy(CheckpointError):
    """Another live training process holds the run directory."""


class TaskError(GptjaxError, ValueError):
    """A task file or name cannot be used; the message says what to fix."""


class GenerationError(GptjaxError, ValueError):
    """A sampling request cannot be served (empty prompt, token outside the vocabulary, ...)."""


class ConversionError(GptjaxError, ValueError):
    """A Hugging Face checkpoint cannot be converted; the message says why."""


class SweepError(GptjaxError, ValueError):
    """A sweep config, sweep directory or results file cannot be used; the message says how to fix it."""


class HarnessError(GptjaxError, RuntimeError):
    """lm-evaluation-harness is missing or cannot run the request."""


class NonFiniteLoss(GptjaxError, RuntimeError):
    """The loss or the parameters became non-finite; the last good checkpoint is left untouched."""

    exit_code = 1


class Preempted(GptjaxError, RuntimeError):
    """A preemption signal arrived: a checkpoint was saved and the run stopped; rerun to resume."""

    exit_code = 143
    prefix = ""


def report(e: GptjaxError) -> int:
    """Print `e` as the one line a command shows, and return its exit code."""
    print(f"{e.prefix}{e}", file=sys.stderr)
    return e.exit_code


def run_command(fn, *args, **kwargs) -> int:
    """Call a command's body and turn what the user can fix into its one line and exit code. A path the user
    gave that does not exist (FileNotFoundError) is reported the same way. Returns fn's int result, or 0."""
    try:
        out = fn(*args, **kwargs)
    except GptjaxError as e:
        return report(e)
    except FileNotFoundError as e:
        print(f"error: no such file: {e.filename or e}", file=sys.stderr)
        return 2
    return out if isinstance(out, int) else 0
