"""Shared library of the image apps: data, models, training, reports, export, inference, UI.

Everything an exported learner refers to (label functions, image types, custom models) lives here,
never in a script's `__main__`, so a `.pkl` loads from any script, server or Space.
"""
import os
import sys
import warnings

# Idle OpenMP threads sleep instead of spinning. On a CPU shared with other programs (or with data
# loading), spinning threads take the cores the busy ones need, and every one of the model's many small
# operations waits for its slowest thread; on the 2-core machine of README "Speed" a training step took
# several times longer. Set here because OpenMP reads it once, when PyTorch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# fastai's layers call torch.jit.script at import; the deprecation is fastai's to fix, not our users'.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)


class UserError(Exception):
    """A problem the user can fix (bad path, no network, ...): shown as one line, no traceback."""


def run_cli(main, argv=None):
    """Run a command-line entry point; a `UserError` or Ctrl-C ends it with one line on stderr."""
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: nothing was exported", file=sys.stderr)
        sys.exit(130)
