"""Run a script and SIGKILL it at its N-th filesystem event: a crash point that is the same on every run, for
tests/test_faults.py.

    FAULT_ROOT=/out FAULT_AT=17 python tests/faultkill.py train_sft.py --output_dir /out ...
    FAULT_ROOT=/out FAULT_COUNT=/tmp/n python tests/faultkill.py convert.py ...   # count the events, no kill

Events, as Python's audit hooks report them for paths under FAULT_ROOT in the main process (forked workers
and caches elsewhere do not count, so the sequence is deterministic): a file opened for writing, a rename
or replace, a removal, a mkdir, and each torch.save. The kill lands just before the event's effect, except
that a torch.save killed at its event is torn: half its bytes reach the file first, as when a write is cut.
"""

import os
import runpy
import signal
import sys

ROOT = os.path.realpath(os.environ["FAULT_ROOT"])
AT = int(os.environ.get("FAULT_AT", "0"))
COUNT = os.environ.get("FAULT_COUNT")
MAIN = os.getpid()
WATCHED = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "shutil.copyfile"}
events = 0


def ours(path) -> bool:
    try:
        return os.path.realpath(os.fsdecode(path)).startswith(ROOT)
    except (TypeError, ValueError):
        return False  # a file descriptor or an odd object: not a path we watch


def event() -> bool:
    """Count one event; True when it is the one to die at."""
    global events
    if os.getpid() != MAIN:
        return False
    events += 1
    return events == AT


def die(what: str, path):
    if os.environ.get("FAULT_LOG"):  # where it died, for the test's table
        with open(os.environ["FAULT_LOG"], "w") as f:
            f.write(f"{what} {os.fsdecode(path)}")
    sys.stdout.flush()
    os.kill(MAIN, signal.SIGKILL)


def hook(name, args):
    if name == "open":
        path, mode, flags = args
        if mode is None:  # os.open: flags only
            writing = bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        else:
            writing = any(c in str(mode) for c in "wax+")
        if writing and ours(path) and event():
            die("open", path)
    elif name in WATCHED and args and ours(args[0]) and event():
        die(name, args[0])


def patch_torch_save():
    import io

    import torch

    real = torch.save

    def save(obj, f, *args, **kwargs):
        target = f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", None)
        if target is not None and ours(target) and event():
            buf = io.BytesIO()
            real(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            if isinstance(f, (str, os.PathLike)):
                with open(f, "wb") as out:  # counted as an event too, but we die right after
                    out.write(data[:len(data) // 2])
            else:
                f.write(data[:len(data) // 2])
                f.flush()
            die("torch.save (torn)", target)
        return real(obj, f, *args, **kwargs)

    torch.save = save


def report():
    if COUNT and os.getpid() == MAIN:
        with open(COUNT, "w") as f:
            f.write(str(events))


if __name__ == "__main__":
    import atexit

    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    patch_torch_save()
    sys.addaudithook(hook)
    atexit.register(report)
    runpy.run_path(script, run_name="__main__")
