"""A fault for Ray workers, installed by the tests' ray.init (runtime_env's worker_process_setup_hook; pickled
by value, since workers cannot import the tests): while FAULTS_DIR/armed exists, the first compile or tune
trial to claim it (renaming it to fired) kills its own worker with SIGKILL, mid-task, so Ray must rerun it."""
import os
import signal


def install():
    from fgcompile import batch
    from fgcompile.runtime import tune
    folder = os.environ["FAULTS_DIR"]

    def dying(fn):
        def first_attempt_dies(*args, **kw):
            try:
                os.rename(os.path.join(folder, "armed"), os.path.join(folder, "fired"))
            except OSError:   # not armed, or another worker claimed it
                return fn(*args, **kw)
            os.kill(os.getpid(), signal.SIGKILL)
        return first_attempt_dies

    batch.compile_model = dying(batch.compile_model)
    tune.scored_trial = dying(tune.scored_trial)
