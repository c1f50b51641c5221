"""Run one function in a child process under a memory limit and a time limit; report how it ended.

The hostile-file tests open files built to crash the interpreter, exhaust memory or hang. In the test
process, one such failure would take pytest down with it (or the machine: the runner is shared); in a
child it becomes an ordinary test failure that says what happened. Children fork from a forkserver that
imported torch once, so each costs milliseconds, not an import. In the child:

- RLIMIT_AS caps the address space at what the child already maps plus `memory_mb`, so an allocation
  bomb fails with MemoryError instead of swapping; the peak resident growth (VmHWM, reset at start) and
  the wall time of the call are measured and reported;
- a crash (SIGSEGV, stack overflow) is seen as the child's exit signal, a hang as the time limit passing;
- optionally RLIMIT_FSIZE caps every file it writes (downloads from an endless server).

`run_bounded("module:function", *args)` returns an Outcome; the function must be importable by name.
"""
import dataclasses
import importlib
import multiprocessing
import resource
import time

PRELOAD = ["torch", "numpy", "requests", "pytest", "hypothesis", "weights", "tokenizer"]


@dataclasses.dataclass
class Outcome:
    status: str              # "returned", "raised", "crashed" or "hung"
    error: str = ""          # the exception's type name
    message: str = ""
    bases: tuple = ()        # the exception's class names, most derived first
    result: str = ""         # repr of what the function returned
    seconds: float = 0.0     # wall time of the call in the child
    peak_mb: float = 0.0     # peak resident memory the call added

    def raised(self, *names):
        return self.status == "raised" and any(name in self.bases for name in names)

    def __str__(self):
        return (f"{self.status} {self.error}: {self.message[:300]} {self.result[:200]} "
                f"({self.seconds:.3f} s, +{self.peak_mb:.0f} MB)")


def _status_kb(field):
    """A field of /proc/self/status in kB (0 where there is no /proc: then memory is not measured)."""
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith(field + ":")), 0)
    except OSError:
        return 0


def _resolve(target):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _child(connection, target, args, memory_bytes, seconds, setup, file_bytes):
    import signal

    import torch
    torch.set_num_threads(1)  # no thread pool: nothing reserves address space behind the limit's back
    if _status_kb("VmSize"):  # Linux; macOS cannot limit its address space this way
        limit = _status_kb("VmSize") * 1024 + memory_bytes
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS counter (Linux >= 4.0) to the current RSS
    resource.setrlimit(resource.RLIMIT_CPU, (int(seconds) + 5, int(seconds) + 5))
    if file_bytes:  # no file written may grow past this (an unbounded download then fails, not the disk)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writing past it raises OSError(EFBIG) instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    function = _resolve(target)
    if setup:  # untimed preparation whose result becomes the first argument (e.g. an optimizer to load into)
        args = (_resolve(setup)(),) + tuple(args)
    resident = _status_kb("VmRSS")
    start = time.perf_counter()
    try:
        outcome = Outcome("returned", result=repr(function(*args)))
    except BaseException as error:  # MemoryError, RecursionError, KeyboardInterrupt: all are reported
        outcome = Outcome("raised", type(error).__name__, str(error)[:2000],
                          tuple(cls.__name__ for cls in type(error).__mro__))
    outcome.seconds = time.perf_counter() - start
    outcome.peak_mb = max(0, _status_kb("VmHWM") - resident) / 1024
    connection.send(dataclasses.asdict(outcome))


_CONTEXT = []


def run_bounded(target, *args, memory_mb=512, seconds=30, setup=None, file_mb=0):
    """Call `target` ("module:function") with `args` in a fresh child; never raises for what it did.
    `setup` ("module:function"), if given, runs first, untimed, and its result is passed before `args`;
    `file_mb` caps the size of any file the child writes."""
    if not _CONTEXT:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        _CONTEXT.append(context)
    context = _CONTEXT[0]
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(sender, target, args, memory_mb << 20, seconds, setup, file_mb << 20),
                            daemon=True)
    child.start()
    sender.close()
    try:
        if not receiver.poll(seconds):
            child.kill()
            child.join()
            return Outcome("hung", message=f"still running after {seconds} s", seconds=seconds)
        return Outcome(**receiver.recv())
    except EOFError:  # the child died without answering
        child.join()
        return Outcome("crashed", message=f"exit code {child.exitcode} (a negative code is the signal)")
    finally:
        child.join(10)
        receiver.close()
