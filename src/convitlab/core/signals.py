"""Stop signals honoured at step boundaries, and other handlers deferred to them.

SIGTERM and SIGINT stop a run where its state is whole: between training steps, where the loop
calls run_deferred_signals (a checkpoint then saves the step). Handlers that exit (submitit's
requeue) run there too, never inside a Paddle op.
"""
import logging
import os
import signal
import time

from convitlab.core import distributed

log = logging.getLogger(__name__)

_deferred = []  # (handler, signum, frame) of signals caught, waiting for a safe point
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STOP_AGREEMENT_STEPS = 10  # with several ranks, a stop is agreed on every this many training steps
SAME_STOP_S = 2.0          # a repeat this soon is the same request delivered twice, not a second one
_stop = {"signal": None, "at": 0.0, "owner": None}  # the first stop signal, when, and the process it stops


class Interrupted(BaseException):
    """A stop signal (SIGTERM, SIGINT) reached a step boundary. A BaseException, as
    KeyboardInterrupt is: no `except Exception` on the way may swallow it."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(f"stopped by {signal_name(signum)}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_name(signum) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def defer_signal_handlers(signums=(signal.SIGUSR1, signal.SIGUSR2)) -> None:
    """Let the Python handlers installed for these signals (submitit's: requeue, then exit) run
    at the loop's next safe point (run_deferred_signals) instead of wherever Python is when the
    signal comes: inside a Paddle op (a PyLayer's backward) their SystemExit becomes an OSError,
    which fails the job instead of requeueing it."""
    for signum in signums:
        handler = signal.getsignal(signum)
        if callable(handler) and handler is not _request_stop:
            signal.signal(signum, lambda sig, frame, handler=handler: _deferred.append((handler, sig, frame)))


def stop_at_step_boundaries(signums=STOP_SIGNALS) -> None:
    """Make SIGTERM and SIGINT stop the run at its next step boundary (run_deferred_signals
    raises Interrupted there) instead of Paddle's C++ handler (a C++ traceback) or a
    KeyboardInterrupt raised inside an op. A second one stops the process at once, as a kill
    would, unless it comes within SAME_STOP_S: a signal sent to a process group and forwarded
    by a launcher (paddle.distributed.launch, submitit's local controller) arrives twice. Signals
    that another handler owns are left alone: ignored ones (SIG_IGN, e.g. a background job's
    SIGINT) and Python handlers someone else installed (submitit's SIGTERM)."""
    for signum in signums:
        current = signal.getsignal(signum)
        if current is signal.SIG_IGN or (callable(current) and current not in (signal.default_int_handler,
                                                                               _request_stop)):
            continue
        signal.signal(signum, _request_stop)
    _stop["owner"] = os.getpid()


def _request_stop(signum, frame) -> None:
    if os.getpid() != _stop["owner"]:
        return  # a forked data loader worker: its parent stops, then ends it
    name = signal_name(signum)
    if _stop["signal"] is not None:
        if time.monotonic() - _stop["at"] < SAME_STOP_S:
            return  # the same request, delivered to the process group and forwarded again
        os.write(2, f"{name} again: stopping at once; the last checkpoint is kept and the same command "
                    f"resumes from it\n".encode())
        os._exit(128 + signum)  # the second one: no more waiting for a boundary
    _stop["signal"], _stop["at"] = signum, time.monotonic()
    _deferred.append((_raise_interrupted, signum, frame))
    log.warning("%s received: stopping at the next step boundary (%s again stops at once)", name, name)


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(signum)


def stop_signal():
    """The stop signal this process received (None when it has not been asked to stop)."""
    return _stop["signal"]


def run_deferred_signals(step=None) -> None:
    """Run the handlers of the signals caught since the last call (called between steps); raises
    Interrupted when a stop signal came.

    With several ranks a stop must happen at the same step on every rank, or the ones that go on
    wait forever in the next collective: it is agreed on only at training steps (`step`, the
    optimiser step about to be taken, the same on every rank), every STOP_AGREEMENT_STEPS.
    """
    several = distributed.world_size() > 1
    while _deferred:
        handler, signum, frame = _deferred[0]
        if handler is _raise_interrupted and several:
            break  # kept until the ranks agree, below
        _deferred.pop(0)
        handler(signum, frame)
    if not several or step is None or step % STOP_AGREEMENT_STEPS:
        return
    own = _stop["signal"] or 0
    asking, signals = distributed.sum_across_ranks([1.0 if own else 0.0, float(own)])  # every rank takes part
    if asking:
        _deferred[:] = [entry for entry in _deferred if entry[0] is not _raise_interrupted]
        raise Interrupted(own or round(signals / asking))
