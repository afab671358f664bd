"""Shared library of the image apps: data, models, training, reports, export, inference, UI.

Everything an exported learner refers to (label functions, image types, custom models) lives here,
never in a script's `__main__`, so a `.pkl` loads from any script, server or Space.
"""
import argparse
import os
import signal
import socket
import sys
import threading
import warnings
from contextlib import contextmanager
from urllib.parse import urlparse


class UserError(Exception):
    """A problem the user can fix (bad path, no network, ...): shown as one line, no traceback."""

    def __init__(self, line):
        super().__init__(line)
        self.line = line

    def __str__(self):
        # fastai rewrites the message of an exception raised in a callback to name the callback; the user's line stays
        return self.line


def require(rules):
    """One line for the first of `rules` (option, value, whether it holds, what the value must be) that fails."""
    for option, value, holds, must in rules:
        if not holds:
            raise UserError(f"{option} must be {must}, not {value}")


def standard_error(p, n):
    """One standard error of a share `p` (an accuracy) measured on `n` independent images."""
    return (p * (1 - p) / n) ** 0.5


def first_line(error):
    """An exception in one line of at most 200 characters: its type, and its message's first line if any."""
    message = str(error).strip()
    return (f"{type(error).__name__}: {message.splitlines()[0]}" if message else type(error).__name__)[:200]


def proxy_for(url):
    """The proxy the usual environment (`HTTPS_PROXY`, `NO_PROXY`, ...) sets for `url`, if any."""
    from urllib.request import getproxies, proxy_bypass  # here: every entry point imports this package
    parts = urlparse(url)
    return None if proxy_bypass(parts.hostname or "") else getproxies().get(parts.scheme)


CONNECT_TIMEOUT = 3.0  # seconds: `reachable`'s one try


def reachable(url, proxy=None):
    """Whether one TCP connect to `url`'s host (or to `proxy`'s, where its client goes through one) succeeds:
    seconds, where a client's retries offline take a minute."""
    if proxy and "://" not in proxy:
        proxy = f"http://{proxy}"
    target = urlparse(proxy or url)
    if not target.hostname:
        return False
    port = target.port or {"http": 80, "https": 443}.get(target.scheme, 1080)  # else a SOCKS proxy's
    try:
        with socket.create_connection((target.hostname, port), CONNECT_TIMEOUT):
            return True
    except OSError:
        return False


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's `--help` with each option's default, except where there is none (None, or False: a flag not
    given) or its help says it in words."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with `HelpFormatter`, whose mistakes (a mistyped option or value) are one line, as every other
    error here is: its usage block is what `--help` is for."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (--help lists the options)\n")


def setup():
    """The process-wide settings of an entry point; call it before torch is imported (run_cli does).

    Idle OpenMP threads sleep instead of spinning: on a CPU shared with other programs (or with data
    loading), spinning threads take the cores the busy ones need, and every one of the model's many
    small operations waits for its slowest thread. OpenMP reads this once, when PyTorch loads.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # fastai's layers call torch.jit.script at import; the deprecation is fastai's to fix, not our users'.
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
    # A photo's damaged metadata is the camera's doing, and its picture decodes: nothing for the user to act on.
    warnings.filterwarnings("ignore", message="Corrupt EXIF data", category=UserWarning)


def stdout_reader_gone():
    """Call on a BrokenPipeError of standard output: its reader stopped reading (`| head`), which is no error. What
    is still written goes to /dev/null, so that Python's exit flushes nothing more and prints no traceback."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def say(text):
    """Print a line now; a reader that stopped reading (`| head`) stops no work."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        stdout_reader_gone()


def run_cli(main, argv=None, interrupted="interrupted: nothing was exported"):
    """Run a command-line entry point after `setup()`; a `UserError` or Ctrl-C (`interrupted`) ends it with one line
    on stderr.

    Entry points import the training stack inside `main`, so `--help` answers at once and `setup()`
    comes before torch loads.
    """
    setup()
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        # `kill`, `timeout`, `docker stop`, a notebook's stop button: the orderly end of a Ctrl-C (nothing half
        # written, the checkpoint named), not Python's silent exit
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.exit(130)


class Interrupts:
    """What `noted_interrupts` saw: `seen`, a Ctrl-C came; `held`, it is only noted, for `check` to raise."""

    def __init__(self):
        self.seen = self.held = False

    def check(self):
        if self.seen:
            raise KeyboardInterrupt


@contextmanager
def noted_interrupts():
    """Note every Ctrl-C (SIGINT, and SIGTERM where run_cli made it one) during the block, and raise it as Python does
    unless the `Interrupts` yielded are `held`; the previous handlers again after the block.

    Python raises a Ctrl-C wherever the main thread is, also inside a finalizer (`__del__`, a weakref callback)
    that the garbage collector runs: there it is printed and dropped, and the block would go on as if it had not
    come. Held, a Ctrl-C cannot cut a sequence of moves at an arbitrary point: it is acted on where `check` is
    called. Only the main thread receives signals, and a Ctrl-C that is ignored (a job started in the background)
    or left to the system stays so: then nothing is noted.
    """
    ctrl_c = Interrupts()
    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    previous = {sig: handler for sig, handler in previous.items() if callable(handler)}

    def note(signum, frame):
        ctrl_c.seen = True
        if not ctrl_c.held:
            previous[signum](signum, frame)
    for sig in previous:
        signal.signal(sig, note)
    try:
        yield ctrl_c
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
