"""Resumable training state: where the run is, the weights, the optimizer and the RNG state.

Keras's BackupAndRestore restores only the epoch of one fit() call and deletes its backup when fit()
ends; a two-phase run needs its own record of which phase has finished. Each save writes a new
`checkpoints/state-NNNNNN/` directory and then atomically replaces `checkpoints/state.json`, which
points at it, so a kill at any moment leaves either the old or the new state, never a torn one.
"""

import dataclasses
import json
import os
import shutil

from absl import logging
import keras
import numpy as np

STATE_FILE = "state.json"


@dataclasses.dataclass
class RunState:
    """Progress of a run. `epoch` counts finished epochs across both phases; `step` counts finished
    steps inside epoch `epoch` (non-zero only with --save_every_steps)."""

    phase: str = "head"  # head | finetune | export | done
    epoch: int = 0
    export_dir: str = ""
    step: int = 0
    best_value: float = float("-inf")
    save_id: int = 0


def checkpoint_dir(model_dir: str) -> str:
    return os.path.join(model_dir, "checkpoints")


def load_state(model_dir: str) -> RunState | None:
    path = os.path.join(checkpoint_dir(model_dir), STATE_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        data = json.load(f)
    return RunState(**{k: v for k, v in data.items() if k in RunState.__dataclass_fields__})


def save_state(model_dir: str, state: RunState, classifier: keras.Model | None = None,
               fit_model: keras.Model | None = None):
    """Write weights, optimizer and RNG state (when given) and then the pointer, atomically."""
    directory = checkpoint_dir(model_dir)
    os.makedirs(directory, exist_ok=True)
    if classifier is not None:
        state.save_id += 1
        target = os.path.join(directory, f"state-{state.save_id:06d}")
        tmp = target + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        classifier.save_weights(os.path.join(tmp, "model.weights.h5"))
        np.savez(os.path.join(tmp, "rng.npz"), *[v.numpy() for v in _rng_variables(classifier)])
        if fit_model is not None:
            np.savez(os.path.join(tmp, "training.npz"), *[v.numpy() for v in fit_model.optimizer.variables])
        os.replace(tmp, target)
    _write_json(os.path.join(directory, STATE_FILE), dataclasses.asdict(state))
    if classifier is not None:
        _remove_old_states(directory, keep=f"state-{state.save_id:06d}")


def restore(model_dir: str, state: RunState, classifier: keras.Model,
            fit_model: keras.Model | None = None):
    """Load the weights and RNG state saved with `state` and, if fit_model is compiled, its optimizer.

    The RNG state (dropout's seed generators) carries over phases, so it is restored even at the phase
    boundary, where the optimizer starts fresh.
    """
    target = _latest_state_dir(model_dir, state)
    classifier.load_weights(os.path.join(target, "model.weights.h5"))
    _assign(_rng_variables(classifier), os.path.join(target, "rng.npz"))
    training = os.path.join(target, "training.npz")
    if fit_model is None or not os.path.exists(training):
        return False
    fit_model.optimizer.build(fit_model.trainable_variables)
    if not _assign(list(fit_model.optimizer.variables), training):
        logging.warning("Saved optimizer state does not match this phase; starting it fresh.")
        return False
    logging.info("Restored weights, optimizer (step %d) and RNG state from %s.",
                 int(fit_model.optimizer.iterations.numpy()), target)
    return True


def _assign(variables, path: str) -> bool:
    if not os.path.exists(path):
        return False
    saved = np.load(path)
    values = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    if len(values) != len(variables) or any(tuple(v.shape) != a.shape for v, a in zip(variables, values)):
        return False
    for variable, value in zip(variables, values):
        variable.assign(value)
    return True


def _latest_state_dir(model_dir: str, state: RunState) -> str:
    return os.path.join(checkpoint_dir(model_dir), f"state-{state.save_id:06d}")


def _rng_variables(model: keras.Model):
    """Variables that are not weights: the seed generators' states (dropout), in a stable order."""
    weights = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in weights]


def _remove_old_states(directory: str, keep: str):
    """Older states are only garbage once the pointer names the new one."""
    for name in os.listdir(directory):
        if name.startswith("state-") and name != keep:
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def _write_json(path: str, data):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
