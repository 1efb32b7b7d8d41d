"""A stand-in torchrun worker for tests/launch/test_torchrun_signal.py: ``python -m tests.launch._signal_worker
MODE``. It prints ``ready PID`` and waits; on SIGTERM, MODE=saves exits 75 (as llmforge.train does after saving),
MODE=stubborn ignores the signal (a worker that cannot finish in time) until it is killed."""
import os
import signal
import sys
import time

if __name__ == "__main__":
    mode = sys.argv[-1]  # launch.torchrun passes CONFIG first
    signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "stubborn" else lambda *_: sys.exit(75))
    print(f"ready {os.getpid()}", flush=True)
    time.sleep(120)
