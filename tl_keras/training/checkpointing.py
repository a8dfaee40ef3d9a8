"""Resumable training state: where the run is, the weights, the optimizer and the RNG state.

Keras's BackupAndRestore restores only the epoch of one fit() call and deletes its backup when fit()
ends; a run of several stages needs its own record of which stage has finished. Each save writes a new
`checkpoints/state-NNNNNN/` directory and then atomically replaces `checkpoints/state.json`, which
points at it, so a kill at any moment leaves either the old or the new state, never a torn one.

Optimizer and RNG variables are stored by their Keras path, not by position: Adam's two moments have
the same shapes, so a change of order would otherwise swap them silently.

With --ema_decay the state holds the raw weights, and the optimizer's variables include the averages,
so a resume continues both; latest.weights.h5 and best.weights.h5 hold the averages (training/ema.py).
"""

import dataclasses
import os
import shutil

from absl import logging
import keras
import numpy as np

from tl_keras import files
from tl_keras.training import ema

STATE_FILE = "state.json"
LATEST = "latest.weights.h5"
BEST = "best.weights.h5"
STAGE_BEST = "stage_best.weights.h5"  # --early_stopping_patience: the stage in progress's best weights.
MODEL_FILE = "model.weights.h5"
OPTIMIZER_FILE = "optimizer.npz"
RNG_FILE = "rng.npz"


@dataclasses.dataclass
class RunState:
    """Progress of a run. `stage` is the index of the stage in progress (schedule.build_stages), and
    `stage_name` its name; `status` is train until every stage has finished, then export, then done.
    `epoch` counts finished epochs across all stages; `step` counts finished steps inside epoch `epoch`
    (non-zero only with --save_every_steps)."""

    stage: int = 0
    stage_name: str = ""
    status: str = "train"  # train | export | done
    epoch: int = 0
    export_dir: str = ""
    step: int = 0
    best_value: float | None = None  # Best validation accuracy so far; None before the first.
    save_id: int = 0
    plan: dict | None = None  # A --time_budget run's plan (budget.Plan), made once and kept on resume.
    elapsed_seconds: float = 0.0  # Wall time of the run's processes up to this save.
    # --early_stopping_patience, for the stage in progress: its best validation accuracy, the epochs
    # since it improved, and whether the stage was ended early. Reset when a stage starts.
    stage_best_value: float | None = None
    stage_wait: int = 0
    stage_stopped: bool = False
    learning_rates: dict = dataclasses.field(default_factory=dict)  # Rates that 'auto' chose, by flag.
    phase: str | None = None  # The two-phase version's head|finetune|export|done, converted on resume.


def checkpoint_dir(model_dir: str) -> str:
    return os.path.join(model_dir, "checkpoints")


def load_state(model_dir: str) -> RunState | None:
    data = files.read_json(os.path.join(checkpoint_dir(model_dir), STATE_FILE))
    if data is None:
        return None
    return RunState(**{k: v for k, v in data.items() if k in RunState.__dataclass_fields__})


def copy_state(source: str, target: str):
    """Start `target` (a non-chief worker's own directory) from the state saved in `source` (the
    chief's model_dir), so that every worker resumes at the same step: one that started again from
    epoch 0 while the chief resumed would run other collectives than the chief."""
    state = load_state(source)
    if state is None:
        return
    os.makedirs(checkpoint_dir(target), exist_ok=True)
    if state.save_id:
        shutil.copytree(_state_dir(source, state), _state_dir(target, state), dirs_exist_ok=True)
    if state.export_dir:  # The same version number, in the worker's own export directory.
        state.export_dir = os.path.join(target, "export", os.path.basename(state.export_dir))
    files.write_json(os.path.join(checkpoint_dir(target), STATE_FILE), dataclasses.asdict(state))
    logging.info("Starting from the chief's state in %s: %d epochs and %d steps done.", source, state.epoch,
                 state.step)


def save_state(model_dir: str, state: RunState, classifier: keras.Model | None = None,
               fit_model: keras.Model | None = None):
    """Write weights, optimizer and RNG state (when given) and then the pointer, atomically."""
    directory = checkpoint_dir(model_dir)
    os.makedirs(directory, exist_ok=True)
    if classifier is not None:
        state.save_id += 1
        target = _state_dir(model_dir, state)
        # No pointer names a state newer than its own: such a directory is a killed save's leftover.
        shutil.rmtree(target, ignore_errors=True)
        with files.atomic_path(target) as tmp:
            os.makedirs(tmp)
            classifier.save_weights(os.path.join(tmp, MODEL_FILE))
            np.savez(os.path.join(tmp, RNG_FILE), **_arrays(rng_variables(classifier)))
            if fit_model is not None:
                np.savez(os.path.join(tmp, OPTIMIZER_FILE), **_arrays(optimizer_variables(fit_model)))
    files.write_json(os.path.join(directory, STATE_FILE), dataclasses.asdict(state))
    if classifier is not None:
        _remove_old_states(directory, keep=os.path.basename(_state_dir(model_dir, state)))


def restore(model_dir: str, state: RunState, classifier: keras.Model,
            fit_model: keras.Model | None = None) -> bool:
    """Load the weights and RNG state saved with `state` and, if fit_model is compiled, its optimizer.

    The RNG state (dropout's seed generators) carries over phases, so it is restored even at the phase
    boundary, where the optimizer starts fresh. Returns whether the optimizer was restored.
    """
    target = _state_dir(model_dir, state)
    classifier.load_weights(os.path.join(target, MODEL_FILE))
    assign_by_path(rng_variables(classifier), os.path.join(target, RNG_FILE))
    saved = os.path.join(target, OPTIMIZER_FILE)
    if fit_model is None or not os.path.exists(saved):
        return False
    fit_model.optimizer.build(fit_model.trainable_variables)
    problem = assign_by_path(optimizer_variables(fit_model), saved)
    if problem:
        logging.warning("Saved optimizer state does not match this phase (%s); starting it fresh.", problem)
        return False
    logging.info("Restored weights, optimizer (step %d) and RNG state from %s.",
                 int(fit_model.optimizer.iterations.numpy()), target)
    return True


def optimizer_variables(model: keras.Model) -> dict:
    """The optimizer's variables by their name below the optimizer that owns them ('iteration',
    'block5_conv1_kernel_momentum'). Not by path: Keras numbers optimizers per process (adam, adam_1,
    ...), and an optimizer built inside a wrapper's apply gets the wrapper's name in its paths too
    ('loss_scale_optimizer_3/adam_1/...'), so neither may be part of a key that must match after a
    restart.

    Wrapped optimizers: a mixed_float16 LossScaleOptimizer's own variables go under 'loss_scale/' and
    its inner optimizer's keys are the unwrapped ones; a MultiOptimizer's sub-optimizers go under
    their own names ('adam_block5/iteration'), which must therefore be stable (training/optimizers.py
    names them after their blocks).
    """
    keyed = {}

    def visit(optimizer, label: str):
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            children, own_label = [(optimizer.inner_optimizer, label)], label + "loss_scale/"
        elif isinstance(optimizer, keras.optimizers.MultiOptimizer):
            children, own_label = [(sub, f"{label}{sub.name}/") for sub in optimizer.optimizers], label
        else:
            children, own_label = [], label
        nested = {id(v) for child, _ in children for v in child.variables}
        for v in optimizer.variables:
            if id(v) not in nested:
                keyed[own_label + v.name] = v
        for child, child_label in children:
            visit(child, child_label)

    visit(model.optimizer, "")
    return _unique(keyed, model.optimizer.variables)


def rng_variables(model: keras.Model) -> dict:
    """Variables that are not weights (the seed generators' states, for dropout), keyed by the named
    layer that owns them: seed generators are numbered per process, layers are named."""
    weights = {id(v) for v in model.weights}
    found, seen = {}, 0

    def visit(layer):
        nonlocal seen
        if isinstance(layer, keras.Model):
            for sublayer in layer.layers:
                visit(sublayer)
            return
        for variable in layer.variables:
            if id(variable) not in weights:
                found[f"{layer.name}/{variable.name}"] = variable
                seen += 1

    visit(model)
    return _unique(found, [None] * seen)


def _unique(keyed: dict, variables) -> dict:
    if len(keyed) != len(variables):
        raise ValueError(f"{len(variables)} variables map to {len(keyed)} keys; they cannot be checkpointed "
                         "by path.")
    return keyed


def _arrays(keyed: dict) -> dict:
    return {key: np.asarray(variable.numpy()) for key, variable in keyed.items()}


def assign_by_path(variables: dict, path: str) -> str | None:
    """Assign each variable (keyed as optimizer_variables and rng_variables key them) the array saved
    under its key; all or nothing.

    Returns None on success, else why nothing was assigned (a missing, extra or reshaped variable).
    """
    if not os.path.exists(path):
        return f"{os.path.basename(path)} is missing"
    with np.load(path) as saved:
        stored = {name: saved[name] for name in saved.files}
    if set(variables) != set(stored):
        missing, extra = sorted(set(variables) - set(stored)), sorted(set(stored) - set(variables))
        return (f"not saved: {', '.join(missing[:3]) or 'none'}; "
                f"not in this model: {', '.join(extra[:3]) or 'none'}")
    for name, variable in variables.items():
        if tuple(variable.shape) != stored[name].shape:
            return f"{name} has shape {tuple(variable.shape)}, saved {stored[name].shape}"
    for name, variable in variables.items():
        variable.assign(stored[name])
    return None


def _state_dir(model_dir: str, state: RunState) -> str:
    return os.path.join(checkpoint_dir(model_dir), f"state-{state.save_id:06d}")


def _remove_old_states(directory: str, keep: str):
    """Older states are only garbage once the pointer names the new one."""
    for name in os.listdir(directory):
        if name.startswith("state-") and name != keep:
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def save_weights(model: keras.Model, path: str):
    """The classifier's weights as a `.weights.h5` file, replaced atomically."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with files.atomic_path(path, suffix=".weights.h5") as tmp:
        model.save_weights(tmp)


class TrainingCheckpoint(keras.callbacks.Callback):
    """Save resumable state at each epoch end (and every `save_every_steps` steps), plus the
    classifier's latest and best (by validation accuracy) weights for evaluate and export.

    Phase 1 may fit a head-only model on cached features, so this saves `classifier` explicitly
    rather than whatever model fit() is running; the optimizer comes from the fitted model.
    `step_offset` is the number of steps of the current epoch done before this fit() began (a
    mid-epoch resume), and `steps_per_epoch` the steps of the epochs this fit() runs (a planned phase
    may end with a shorter one); each fit() gets its own callback.
    """

    def __init__(self, classifier: keras.Model, model_dir: str, state: RunState, steps_per_epoch: int,
                 save_every_steps: int | None = None, step_offset: int = 0, monitor: str = "val_accuracy",
                 clock=None):
        super().__init__()
        self.clock = clock  # The run's wall time, recorded with each save.
        self.classifier = classifier
        self.model_dir = model_dir
        self.state = state
        self.steps_per_epoch = steps_per_epoch
        self.save_every_steps = save_every_steps
        self.step_offset = step_offset
        self.monitor = monitor

    def on_train_batch_end(self, batch, logs=None):
        done = self.step_offset + batch + 1
        if self.save_every_steps and done % self.save_every_steps == 0 and done < self.steps_per_epoch:
            self.state.step = done
            self._save()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        self.step_offset = 0  # Later epochs of this fit() start at their first step.
        directory = checkpoint_dir(self.model_dir)
        with ema.averaged(self.model.optimizer):  # --ema_decay: evaluate and export use the average.
            save_weights(self.classifier, os.path.join(directory, LATEST))
            value = logs.get(self.monitor)
            if value is not None and (self.state.best_value is None or value > self.state.best_value):
                self.state.best_value = float(value)
                save_weights(self.classifier, os.path.join(directory, BEST))
        self.state.epoch, self.state.step = epoch + 1, 0
        self._save()

    def _save(self):
        if self.clock:
            self.state.elapsed_seconds = round(self.clock(), 2)
        save_state(self.model_dir, self.state, self.classifier, self.model)
