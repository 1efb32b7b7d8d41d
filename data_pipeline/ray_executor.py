"""Ray executor (``executor=ray``): the same stages, tasks and done markers as the local and Slurm executors,
each pending task of a stage submitted as a Ray task, stage after stage.

Where it runs (``ray.address``): empty = ``RAY_ADDRESS`` if set, else the cluster most recently started on this
machine with ``ray start``, else a new local Ray instance with ``workers`` CPUs (stopped at the end); ``auto`` =
an existing cluster only; ``HOST:6379`` = a cluster's GCS address; ``ray://HOST:10001`` = Ray Client. Workers
must be able to import this package and see ``output_dir`` and the inputs at the same paths (a shared file
system): tasks exchange nothing but their files and markers, exactly as Slurm array tasks do. A worker that dies
is retried (``ray.max_retries``): tasks write atomically and skip themselves once their marker exists.

Connecting never hangs: a cluster that does not answer within ``ray.connect_timeout`` seconds fails the run in one
line naming the address, and SIGTERM / Ctrl-C stop the run at any moment, as with the local executor (exit 143 /
130). Without Ray installed, ``require_ray`` says how to install it before the output folder is touched.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import threading
import time

from tqdm import tqdm

from .config import ConfigError
from .executor import PipelineError, Stage, is_done, run_task, task_error

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RayJobError(PipelineError):
    """Ray itself failed (cluster unreachable, worker or node lost after retries): work/ stays for a rerun."""

    keep_work = True


def require_ray() -> None:
    """executor=ray needs Ray, an optional dependency: checked before anything is written, in one line."""
    try:
        import ray  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"executor=ray needs Ray, which does not import here ({e}): pip install 'llmforge[ray]' "
                          "(or pip install ray)") from None


class _DropThreadWarning(logging.Filter):
    """ray.init from a helper thread warns that it cannot set its SIGTERM handler: intended (the CLI's handler
    must stay), so the warning is noise on the one-line error output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


def _writes_fd2(stream) -> bool:
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, ValueError):  # a test's capture object
        return False


def _init(ray, timeout: float | None, what: str, **kw) -> None:
    """ray.init(**kw) in a helper thread that the main thread waits for. ray.init blocks in C++ while it looks for
    the cluster (minutes, for an address where none listens), where no Python signal handler runs; waiting here
    instead, the CLI's SIGTERM/Ctrl-C handlers run at once, and after ``timeout`` seconds the run fails. (From the
    main thread ray.init would also replace the CLI's SIGTERM handler by its own sys.exit.) An abandoned thread is a
    daemon: it does not keep the process alive."""
    done, box = threading.Event(), {}

    def target():
        try:
            ray.init(**kw)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            box["error"] = e
        finally:
            done.set()

    quiet = _DropThreadWarning()
    logging.getLogger("ray._private.worker").addFilter(quiet)
    with tempfile.TemporaryFile() as captured:
        # Ray's C++ client writes its retry warnings ("Failed to connect to GCS ...") straight to fd 2, before its
        # log settings apply: held back while connecting, shown only if the connection succeeds.
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        timed_out = False
        try:
            threading.Thread(target=target, name="ray-init", daemon=True).start()
            deadline = None if timeout is None else time.monotonic() + timeout
            while not done.wait(0.2):
                if deadline is not None and time.monotonic() > deadline:
                    timed_out = True
                    raise RayJobError(f"{what}: no Ray cluster answered within {timeout:g} s (ray.connect_timeout); "
                                      "is `ray start --head` running there?")
        finally:
            sys.stderr.flush()
            if timed_out and _writes_fd2(sys.stderr):
                # The abandoned thread's C++ client still writes to fd 2 ("Failed to connect to GCS ... within 5
                # seconds", also after the run's one line): fd 2 stays captured, Python's stderr gets the real one.
                sys.stderr = os.fdopen(saved, "w", buffering=1)
            else:
                os.dup2(saved, 2)
                os.close(saved)
            logging.getLogger("ray._private.worker").removeFilter(quiet)
        if "error" not in box:
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
    if "error" in box:
        raise box["error"]


def _ray_task(ctx, stage: Stage, rank: int, cwd: str) -> str | None:
    """Runs on a Ray worker; returns None or the task's one-line error (raised by the driver, not re-pickled)."""
    os.chdir(cwd)  # config paths (inputs, output_dir) are relative to where the run was started
    try:
        run_task(ctx, stage, rank)
        return None
    except Exception as e:  # noqa: BLE001 - reported by the driver with the task named
        return str(task_error(stage.name, rank, e))


def _send_token_if_any() -> None:
    """`ray start` turns token authentication on by itself when a token exists (~/.ray/auth_token), but Ray
    enables it in a driver only for a cluster it finds without an address. Given an address, send the token
    whenever one exists (a cluster without authentication accepts it too), unless RAY_AUTH_MODE says otherwise."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or \
            os.path.exists(os.path.join(os.path.expanduser("~"), ".ray", "auth_token")):
        os.environ["RAY_AUTH_MODE"] = "token"
        if "ray" in sys.modules:  # already imported: refresh its cached config, as ray.init does for a local cluster
            from ray._raylet import Config
            Config.initialize("")


class RayExecutor:
    def __init__(self, cfg):
        self.cfg = cfg

    def _connect(self) -> bool:
        """ray.init for ``ray.address``; returns whether this call started a new local instance."""
        if self.cfg.ray.address or os.environ.get("RAY_ADDRESS"):
            _send_token_if_any()  # before Ray reads its config
        require_ray()
        import ray
        rc = self.cfg.ray
        env = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
               # lets a cluster on this machine import the package even when it is not pip-installed
               "PYTHONPATH": os.pathsep.join(p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")) if p)}
        kw = dict(runtime_env={"env_vars": env}, log_to_driver=rc.log_to_driver, configure_logging=False)
        address = rc.address or os.environ.get("RAY_ADDRESS", "")
        if address:
            what = f"ray.address={address}"
            try:
                _init(ray, rc.connect_timeout, what, address=address, **kw)
            except RayJobError:
                raise
            except Exception as e:  # noqa: BLE001 - ConnectionError, RuntimeError, ...: one line either way
                raise RayJobError(f"{what}: cannot connect to a Ray cluster "
                                  f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
            return False
        # No address: a cluster started on this machine with `ray start` if there is one, else a new instance.
        try:
            _init(ray, rc.connect_timeout, "ray.address=auto (the cluster `ray start` left on this machine)",
                  address="auto", **kw)
            return False
        except (ConnectionError, RuntimeError):
            pass
        # Started from this (main) thread: Ray ties the processes it starts to the thread that starts them
        # (PR_SET_PDEATHSIG), so a helper thread's end would kill them. Nothing remote to wait for here.
        previous = signal.getsignal(signal.SIGTERM)
        main = threading.current_thread() is threading.main_thread()
        try:
            ray.init(num_cpus=self.cfg.workers, include_dashboard=False, object_store_memory=rc.object_store_mb << 20,
                     **kw)
        except SystemExit as e:  # ray.init's own SIGTERM handler: sys.exit(15)
            if e.code != signal.SIGTERM or not main or previous is None:
                raise
            signal.signal(signal.SIGTERM, previous)
            signal.raise_signal(signal.SIGTERM)  # the CLI's handler: exit 143 and its one line
            raise
        finally:
            if previous is not None and main:
                signal.signal(signal.SIGTERM, previous)  # ray.init put its own sys.exit there: the CLI's again
        return True

    def run(self, ctx, stages: list[Stage]) -> dict[str, float]:
        self._connect()
        import ray
        rc = self.cfg.ray
        remote = ray.remote(_ray_task).options(num_cpus=rc.num_cpus_per_task, max_retries=rc.max_retries)
        walls: dict[str, float] = {}
        refs: dict = {}
        try:
            ctx_ref = ray.put(ctx)
            for stage in stages:
                pending = [r for r in range(stage.n_tasks) if not is_done(ctx.work, stage.name, r)]
                t0 = time.perf_counter()
                refs = {remote.remote(ctx_ref, stage, r, os.getcwd()): r for r in pending}
                with tqdm(total=stage.n_tasks, initial=stage.n_tasks - len(pending), desc=f"{stage.name:>10}",
                          unit="task", disable=not self.cfg.progress, file=sys.stderr, leave=True) as bar:
                    while refs:
                        done, _ = ray.wait(list(refs), num_returns=1, timeout=0.5)  # signals run between waits
                        if not done:
                            continue
                        rank = refs.pop(done[0])
                        try:
                            err = ray.get(done[0])
                        except ray.exceptions.RayError as e:
                            raise RayJobError(f"ray: stage {stage.name} task {rank} failed: "
                                              f"{type(e).__name__}: {str(e).strip().splitlines()[-1]}") from None
                        if err:
                            raise PipelineError(err)
                        bar.update(1)
                walls[stage.name] = time.perf_counter() - t0
        finally:
            for ref in refs:  # an error or Ctrl-C: stop the rest of the stage
                ray.cancel(ref, force=True)
            ray.shutdown()  # disconnects from a cluster; also stops a local instance that _connect started
        return walls
