"""--mode=train: phase 1 (the head on a frozen backbone), phase 2 (fine-tuning), then the export.

A run is resumable: rerunning the same command with the same --model_dir carries on from the last
saved state (see checkpointing.py), in whichever phase it stopped.
"""

import os
import time

from absl import logging
import keras

from tl_keras.config import Config
from tl_keras.errors import UserError
from tl_keras.model import backbones
from tl_keras.model import classifier
from tl_keras.reporting import evaluation
from tl_keras.reporting import summaries
from tl_keras.serving import export as export_lib
from tl_keras.training import checkpointing
from tl_keras.training import datasets
from tl_keras.training import distribute
from tl_keras.training import guards
from tl_keras.training import multi_worker_compat
from tl_keras.training import run_dir


def train_and_export(config: Config, strategy, data: datasets.Data,
                     signals: guards.Signals | None = None) -> dict:
    """Both phases, then the export, each skipped if a previous attempt already finished it."""
    signals = signals or guards.Signals()
    state = checkpointing.load_state(config.model_dir) or checkpointing.RunState(
        phase="head" if config.head_epochs else "finetune")
    if state.save_id or state.epoch:
        logging.info("Resuming %s: phase %s, %d epochs and %d steps done.", config.model_dir, state.phase,
                     state.epoch, state.step)
        summaries.trim_logs(os.path.join(config.model_dir, run_dir.LOG_DIR), state.epoch,
                            state.epoch * data.train_steps + state.step)
    with strategy.scope():
        model = classifier.build_classifier(
            config.backbone, config.image_size, data.splits.num_classes, config.weights,
            config.head_units, config.head_batchnorm, config.dropout,
            matmul_small_convs=distribute.computes_on_cpu(strategy))
        if state.save_id:
            checkpointing.restore(config.model_dir, state, model)
    if config.finetune_epochs:
        classifier.unfreeze_start(model, config.fine_tune_at)  # A bad name fails now, not after phase 1.
    cache = None
    if datasets.use_feature_cache(config):
        if multi_worker_compat.needed(strategy):
            logging.info("Feature caching is off under multi-worker training: each worker would extract.")
        else:
            cache = datasets.open_feature_cache(config, data)
    metrics = run_dir.read_metrics(config.model_dir)
    board = summaries.RunSummaries(config, data.splits, data.train_steps)
    if not (state.save_id or state.epoch):
        board.write_run_start()

    try:
        if state.phase == "head":
            phase = datasets.head_phase_data(model, config, strategy, data, cache, signals)
            metrics["head"] = train_head(model, phase, config, strategy, data.train_steps, state, board,
                                         signals)
            run_dir.update_metrics(config.model_dir, {"head": metrics["head"]})
            state.phase, state.step = ("finetune" if config.finetune_epochs else "export"), 0
            checkpointing.save_state(config.model_dir, state)
        if state.phase == "finetune":
            phase = datasets.finetune_phase_data(model, config, strategy, data, cache, signals)
            metrics["finetune"] = fine_tune(model, phase, config, strategy, data.train_steps, state, board,
                                            signals)
            run_dir.update_metrics(config.model_dir, {"finetune": metrics["finetune"]})
            state.phase, state.step = "export", 0
            checkpointing.save_state(config.model_dir, state)
    finally:
        board.close()  # Each epoch flushes, so a crash loses at most the current epoch's points.
    if state.phase == "export":
        if config.min_accuracy is not None:
            _check_min_accuracy(config, metrics, model, data)
        if not state.export_dir:
            state.export_dir = export_lib.next_version_dir(os.path.join(config.model_dir, run_dir.EXPORT_DIR))
            checkpointing.save_state(config.model_dir, state)
        checkpointing.save_weights(
            model, os.path.join(checkpointing.checkpoint_dir(config.model_dir), checkpointing.LATEST))
        metrics["export_path"] = export(model, config, data.splits.class_names, state.export_dir)
        run_dir.update_metrics(config.model_dir, {"export_path": metrics["export_path"]})
        state.phase = "done"
        checkpointing.save_state(config.model_dir, state)
    return metrics


def export(model: keras.Model, config: Config, class_names, version_dir: str | None = None) -> str:
    """The SavedModel (and TFLite file) of `model`, with the training pipeline's own preprocessing."""
    return export_lib.export_saved_model(
        model, os.path.join(config.model_dir, run_dir.EXPORT_DIR),
        backbones.get_preprocessing(config.backbone, config.image_size), class_names,
        tflite=config.export_tflite, version_dir=version_dir, max_image_pixels=config.max_image_pixels)


def _check_min_accuracy(config: Config, metrics: dict, model: keras.Model, data: datasets.Data):
    """Refuse to export a model whose final test accuracy is below --min_accuracy."""
    final = metrics.get("finetune") or metrics.get("head")
    if final is None:  # No phase ran, so nothing measured the model yet.
        result = evaluation.evaluate(model, data.test, data.eval_steps, config.label_smoothing)
        final = evaluation.prefixed(result.metrics, "test")
    accuracy = final["test_accuracy"]
    if accuracy < config.min_accuracy:
        raise UserError(f"Test accuracy {accuracy:.4f} is below --min_accuracy, so nothing was exported "
                        f"(checkpoints and metrics.json are kept). "
                        f"Received: min_accuracy={config.min_accuracy}")


def train_head(model: keras.Model, phase: datasets.PhaseData, config: Config, strategy, train_steps: int,
               state: checkpointing.RunState, board: summaries.RunSummaries | None = None,
               signals: guards.Signals | None = None) -> dict:
    """Phase 1: backbone frozen, only the head learns. Returns the phase's test metrics."""
    start = time.time()
    with strategy.scope():
        classifier.freeze_backbone(model)
        cached = phase.model is not model  # The tiny head on stored features: many steps per call.
        per_call = _steps_per_execution(train_steps, state.step, config.save_every_steps,
                                        max(config.steps_per_execution, 16 if cached else 1))
        compile_classifier(phase.model, config.head_learning_rate, config, model.output.shape[-1], per_call)
        if state.epoch or state.step:
            checkpointing.restore(config.model_dir, state, model, phase.model)
    logging.info("Phase 1 (head): %d trainable weights, %d epochs, training %s.",
                 len(model.trainable_weights), config.head_epochs, phase.model.name)
    summary = board and (lambda offset: board.phase_callback(1, model, 0, config.head_learning_rate, offset))
    divergence = _divergence("phase 1 (head)", train_steps, config.head_learning_rate,
                             ("head_learning_rate", config.head_learning_rate))
    _fit(model, phase, config, train_steps, state, config.head_epochs, summary, divergence, signals)
    return _phase_metrics(phase, config, start, 1, config.head_epochs - 1, board)


def fine_tune(model: keras.Model, phase: datasets.PhaseData, config: Config, strategy, train_steps: int,
              state: checkpointing.RunState, board: summaries.RunSummaries | None = None,
              signals: guards.Signals | None = None) -> dict:
    """Phase 2: unfreeze from fine_tune_at, recompile with a fresh, low, warmed-up cosine schedule."""
    start = time.time()
    with strategy.scope():
        classifier.unfreeze_backbone(model, config.fine_tune_at)
        per_call = _steps_per_execution(train_steps, state.step, config.save_every_steps,
                                        config.steps_per_execution)
        schedule = finetune_schedule(config, train_steps)
        compile_classifier(phase.model, schedule, config, model.output.shape[-1], per_call)
        if state.epoch > config.head_epochs or (state.epoch == config.head_epochs and state.step):
            checkpointing.restore(config.model_dir, state, model, phase.model)
    logging.info("Phase 2 (fine-tune): %d trainable weights, %d epochs from %s, training %s.",
                 len(model.trainable_weights), config.finetune_epochs, config.fine_tune_at,
                 phase.model.name)
    state.epoch = max(state.epoch, config.head_epochs)
    summary = board and (lambda offset: board.phase_callback(2, model, config.head_epochs, schedule, offset))
    divergence = _divergence("phase 2 (finetune)", train_steps, schedule,
                             ("finetune_learning_rate", config.finetune_learning_rate))
    end = config.head_epochs + config.finetune_epochs
    _fit(model, phase, config, train_steps, state, end, summary, divergence, signals)
    return _phase_metrics(phase, config, start, 2, end - 1, board)


def _divergence(phase: str, train_steps: int, learning_rate, flag: tuple):
    return lambda offset: guards.StopOnDivergence(phase, train_steps, learning_rate, flag, offset)


def _fit(model, phase: datasets.PhaseData, config: Config, train_steps: int, state, end_epoch: int,
         summary=None, divergence=None, signals: guards.Signals | None = None):
    """fit() from the saved (epoch, step) to end_epoch; a partly done epoch gets its own fit().

    Each fit() gets its own callbacks, told through their constructors how many steps of the current
    epoch were done before it began. In order: the divergence check (before anything logs or saves a
    non-finite step), the summaries, the checkpoint (which saves only after the epoch has been
    logged), and the signal check (after the epoch's save).
    """
    signals = signals or guards.Signals()

    def save_mid_epoch(step: int):
        state.step = step
        checkpointing.save_state(config.model_dir, state, model, phase.model)

    while state.epoch < end_epoch:
        first, skip = state.epoch, state.step
        last = first + 1 if skip else end_epoch
        callbacks = [divergence(skip)] if divergence else []
        callbacks += [summary(skip)] if summary else []
        callbacks.append(checkpointing.TrainingCheckpoint(model, config.model_dir, state, train_steps,
                                                          config.save_every_steps, step_offset=skip))
        callbacks.append(guards.StopOnSignal(signals, save_mid_epoch, train_steps, step_offset=skip))
        with signals.defer():
            phase.model.fit(phase.train(first, skip), initial_epoch=first, epochs=last,
                            steps_per_epoch=train_steps - skip if skip else train_steps,
                            validation_data=phase.validation, validation_steps=config.eval_steps,
                            callbacks=callbacks, shuffle=False, verbose=2, class_weight=phase.class_weight)


def _phase_metrics(phase: datasets.PhaseData, config: Config, start: float, number: int, last_epoch: int,
                   board: summaries.RunSummaries | None) -> dict:
    """The phase's test metrics, from the one evaluation path; the same pass feeds TensorBoard."""
    result = evaluation.evaluate(phase.model, phase.test, config.eval_steps, config.label_smoothing)
    metrics = evaluation.prefixed(result.metrics, "test")
    if board:
        board.write_phase_end(number, last_epoch, result, metrics)
    metrics["wall_seconds"] = round(time.time() - start, 2)
    logging.info("Phase %d test accuracy %.4f (top-5 %.4f) after %.0f s.", number, metrics["test_accuracy"],
                 metrics["test_top5_accuracy"], metrics["wall_seconds"])
    return metrics


def finetune_schedule(config: Config, train_steps: int):
    """Linear warmup to finetune_learning_rate, then cosine decay to zero over phase 2."""
    total_steps = config.finetune_epochs * train_steps
    warmup_steps = min(int(config.finetune_warmup_epochs * train_steps), total_steps - 1)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_steps else config.finetune_learning_rate,
        decay_steps=total_steps - warmup_steps,
        warmup_target=config.finetune_learning_rate if warmup_steps else None,
        warmup_steps=warmup_steps,
    )


def steps_per_execution(train_steps: int, limit: int = 16) -> int:
    """Steps per tf.function call for the tiny head on cached features, where per-step overhead
    dominates. A divisor of train_steps, because Keras rounds each epoch up to a multiple of it."""
    return _steps_per_execution(train_steps, 0, None, limit)


def _steps_per_execution(train_steps: int, skip: int, save_every: int | None, limit: int = 16) -> int:
    counts = [train_steps, train_steps - skip] + ([save_every] if save_every else [])
    return max(d for d in range(1, max(1, limit) + 1) if all(c % d == 0 for c in counts))


def compile_classifier(model: keras.Model, learning_rate, config: Config, num_classes: int,
                       steps_per_execution: int = 1):
    """Always a fresh optimizer: a changed trainable set must never reuse stale optimizer slots."""
    model.compile(
        steps_per_execution=steps_per_execution,
        jit_compile=config.jit_compile,
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
        metrics=[
            keras.metrics.CategoricalAccuracy(name="accuracy"),
            keras.metrics.TopKCategoricalAccuracy(k=min(5, num_classes), name="top5_accuracy"),
        ],
    )
