"""tools/perfprobe.py's profiling hook (research only): when RPYCSVC_PERFPROBE_PROFILE names
a directory, every thread of this process runs under its own cProfile, and each is written
to DIR/<prog>-<pid>-<thread>.prof when the process exits (atexit, or os._exit, which a
worker uses)."""
import os

if os.environ.get("RPYCSVC_PERFPROBE_NAMES"):
    # the kernel's name of each thread is its Python name (so /proc/PID/task/*/comm says
    # which thread spends the CPU)
    import ctypes
    import threading as _t

    _libc = ctypes.CDLL(None)
    _named_run = _t.Thread.run

    def _run_named(self):  # type: ignore[no-untyped-def]
        try:
            _libc.prctl(15, self.name.encode()[:15])
        except Exception:
            pass
        _named_run(self)

    _t.Thread.run = _run_named  # type: ignore[method-assign]

_DIR = os.environ.get("RPYCSVC_PERFPROBE_PROFILE")
if _DIR:
    import atexit
    import cProfile
    import sys
    import threading
    import time

    _profiles = []  # (thread name, Profile)
    _lock = threading.Lock()

    def _prog() -> str:
        argv = " ".join(sys.argv)
        return "worker" if "worker" in argv else ("server" if "serve" in argv else "other")

    _orig_run = threading.Thread.run

    def _run(self):  # type: ignore[no-untyped-def]
        p = cProfile.Profile(time.thread_time)
        with _lock:
            _profiles.append((self.name, p))
        p.enable()
        try:
            _orig_run(self)
        finally:
            p.disable()

    threading.Thread.run = _run  # type: ignore[method-assign]
    _main = cProfile.Profile(time.thread_time)
    _profiles.append(("main", _main))
    _main.enable()
    _done = []

    def _dump() -> None:
        if _done:
            return
        _done.append(1)
        prog = _prog()
        for i, (name, p) in enumerate(list(_profiles)):
            try:
                p.disable()
                p.dump_stats(os.path.join(_DIR, f"{prog}-{os.getpid()}-{i}-{name}.prof"))
            except Exception:
                pass

    atexit.register(_dump)
    _orig_exit = os._exit

    def _exit(code):  # type: ignore[no-untyped-def]
        _dump()
        _orig_exit(code)

    os._exit = _exit

_GC = os.environ.get("RPYCSVC_PERFPROBE_GC")
if _GC:
    # how much CPU this process spends in the garbage collector, by generation
    import atexit as _atexit
    import gc as _gc
    import sys as _sys
    import time as _time

    _spent = {0: [0, 0.0], 1: [0, 0.0], 2: [0, 0.0]}
    _t0 = [0.0]

    def _gc_cb(phase, info):  # type: ignore[no-untyped-def]
        if phase == "start":
            _t0[0] = _time.thread_time()
        else:
            s = _spent[info["generation"]]
            s[0] += 1
            s[1] += _time.thread_time() - _t0[0]

    _gc.callbacks.append(_gc_cb)

    def _gc_dump() -> None:
        with open(os.path.join(_GC, f"gc-{os.getpid()}.txt"), "w") as f:
            f.write(" ".join(_sys.argv[-6:]) + "\n")
            for g, (n, t) in _spent.items():
                f.write(f"gen{g}: {n} collections, {t * 1e3:.1f} ms CPU\n")

    _atexit.register(_gc_dump)
    _orig_exit2 = os._exit

    def _exit2(code):  # type: ignore[no-untyped-def]
        _gc_dump()
        _orig_exit2(code)

    os._exit = _exit2
