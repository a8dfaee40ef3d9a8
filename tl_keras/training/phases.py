"""--mode=train: phase 1 (the head on a frozen backbone), phase 2 (fine-tuning), then the export.

A run is resumable: rerunning the same command with the same --model_dir carries on from the last
saved state (see checkpointing.py), in whichever phase it stopped.
"""

import os
import time

from absl import logging
import keras

from tl_keras.config import Config
from tl_keras.model import classifier
from tl_keras.reporting import evaluation
from tl_keras.reporting import summaries
from tl_keras.serving import export as export_lib
from tl_keras.training import budget
from tl_keras.training import checkpointing
from tl_keras.training import datasets
from tl_keras.training import distribute
from tl_keras.training import exporting
from tl_keras.training import guards
from tl_keras.training import multi_worker_compat
from tl_keras.training import run_dir


def train_and_export(config: Config, strategy, data: datasets.Data,
                     signals: guards.Signals | None = None, started: float | None = None) -> dict:
    """Both phases, then the export, each skipped if a previous attempt already finished it.

    `started` (time.monotonic()) is when this process began, so that a budget counts data preparation.
    """
    signals = signals or guards.Signals()
    state = checkpointing.load_state(config.model_dir) or checkpointing.RunState(
        phase="head" if config.head_epochs else "finetune")
    clock = budget.Clock(state.elapsed_seconds, started)
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
    plan = _plan(config, strategy, data, state, clock) if config.time_budget else None
    lengths = phase_lengths(config, data.train_steps, plan)
    metrics = run_dir.read_metrics(config.model_dir)
    board = summaries.RunSummaries(config, data.splits, data.train_steps)
    if not (state.save_id or state.epoch):
        board.write_run_start(plan.describe() if plan else None)

    try:
        if state.phase == "head":
            phase = datasets.head_phase_data(model, config, strategy, data, cache, signals)
            metrics["head"] = train_head(model, phase, config, strategy, data.train_steps, state, board,
                                         signals, lengths, clock)
            run_dir.update_metrics(config.model_dir, {"head": metrics["head"]})
            state.phase, state.step = ("finetune" if config.finetune_epochs else "export"), 0
            checkpointing.save_state(config.model_dir, state)
        if state.phase == "finetune":
            if plan and not plan.last_phase_fixed:
                plan, lengths = _fix_last_phase(plan, config, data, state, clock)
            phase = datasets.finetune_phase_data(model, config, strategy, data, cache, signals)
            metrics["finetune"] = fine_tune(model, phase, config, strategy, data.train_steps, state, board,
                                            signals, lengths, clock)
            run_dir.update_metrics(config.model_dir, {"finetune": metrics["finetune"]})
            state.phase, state.step = "export", 0
            checkpointing.save_state(config.model_dir, state)
    finally:
        board.close()  # Each epoch flushes, so a crash loses at most the current epoch's points.
    if state.phase == "export":
        if config.min_accuracy is not None:
            exporting.check_min_accuracy(config, metrics.get("finetune") or metrics.get("head"), model,
                                         data.test, data.eval_steps)
        if not state.export_dir:
            state.export_dir = export_lib.next_version_dir(os.path.join(config.model_dir, run_dir.EXPORT_DIR))
            checkpointing.save_state(config.model_dir, state)
        checkpointing.save_weights(
            model, os.path.join(checkpointing.checkpoint_dir(config.model_dir), checkpointing.LATEST))
        metrics["export_path"] = exporting.export(model, config, data.splits.class_names, state.export_dir)
        run_dir.update_metrics(config.model_dir, {"export_path": metrics["export_path"]})
        if plan:
            metrics["budget"] = _budget_report(plan, metrics, clock())
            run_dir.update_metrics(config.model_dir, {"budget": metrics["budget"]})
            logging.info("Budget %s: used %s.", budget.minutes(plan.budget_seconds),
                         budget.minutes(metrics["budget"]["actual_seconds"]))
        state.phase = "done"
        state.elapsed_seconds = round(clock(), 2)
        checkpointing.save_state(config.model_dir, state)
    return metrics


def phase_lengths(config: Config, train_steps: int, plan: budget.Plan | None) -> dict:
    """Each phase's budget.Length: from the epoch flags, or from a --time_budget plan."""
    if plan is None:
        return {"head": budget.Length(config.head_epochs, train_steps),
                "finetune": budget.Length(config.finetune_epochs, train_steps)}
    return {"head": budget.Length.of_steps(plan.head_steps, train_steps),
            "finetune": budget.Length.of_steps(plan.finetune_steps, train_steps)}


def _plan(config: Config, strategy, data: datasets.Data, state, clock) -> budget.Plan:
    """The run's plan: made once, from speeds measured now, and kept in the state for every resume."""
    if state.plan:
        plan = budget.Plan.from_dict(state.plan)
        logging.info("Keeping the plan made when the run began. %s.", plan.describe())
        return plan
    rates = _measure_rates(config, strategy, data)
    plan = budget.make_plan(config.time_budget_seconds, clock(), data.train_steps, config.batch_size,
                            *_evaluated_examples(config, data), rates, config.head_epochs,
                            finetune=bool(config.finetune_epochs))
    logging.info("%s.", plan.describe())
    _store_plan(plan, config, state, clock)
    return plan


def _evaluated_examples(config: Config, data: datasets.Data) -> tuple[int, int]:
    """(validation, test) examples that one evaluation pass reads: all, or --eval_steps batches."""
    def capped(n: int) -> int:
        return min(n, config.eval_steps * config.batch_size) if config.eval_steps else n
    return capped(data.splits.num_validation), capped(data.splits.num_test)


def _store_plan(plan: budget.Plan, config: Config, state, clock):
    state.plan = plan.to_dict()
    state.elapsed_seconds = round(clock(), 2)
    checkpointing.save_state(config.model_dir, state)


def _fix_last_phase(plan: budget.Plan, config: Config, data: datasets.Data, state, clock):
    """Phase 2's steps from the time actually left when it starts; stored, so a resume keeps them."""
    fixed = plan.fix_last(clock(), *_evaluated_examples(config, data), config.batch_size)
    logging.info("Phase 2 starts %s into the budget: %d steps (%.2f epochs; planned %.2f).",
                 budget.minutes(clock()), fixed.finetune_steps, fixed.finetune_epochs, plan.finetune_epochs)
    _store_plan(fixed, config, state, clock)
    return fixed, phase_lengths(config, data.train_steps, fixed)


def _measure_rates(config: Config, strategy, data: datasets.Data) -> budget.Rates:
    """A few timed steps of each phase's kind on a throwaway copy of the classifier, so that the
    run's own weights and optimizer never see them."""
    classes = data.splits.num_classes
    with strategy.scope():
        probe = classifier.build_classifier(
            config.backbone, config.image_size, classes, "none", config.head_units, config.head_batchnorm,
            config.dropout, matmul_small_convs=distribute.computes_on_cpu(strategy))
        compile_classifier(probe, config.head_learning_rate, config, classes)
    head, head_setup = budget.measure_train_rate(probe, data.train(0, 0), config.batch_size)
    finetune, finetune_setup = head, 0.0
    if config.finetune_epochs:
        with strategy.scope():
            classifier.unfreeze_backbone(probe, config.fine_tune_at)
            compile_classifier(probe, config.finetune_learning_rate, config, classes)
        finetune, finetune_setup = budget.measure_train_rate(probe, data.train(0, 0), config.batch_size)
    inference = budget.measure_inference_rate(probe, data.test.repeat(), config.batch_size)
    logging.info("Measured: phase 1 %.0f img/s, phase 2 %.0f img/s, inference %.0f img/s.", head, finetune,
                 inference)
    return budget.Rates(head=head, finetune=finetune, inference=inference, head_setup=round(head_setup, 2),
                        finetune_setup=round(finetune_setup, 2))


def _budget_report(plan: budget.Plan, metrics: dict, total: float) -> dict:
    """The plan beside what happened, for metrics.json."""
    actual = {name: metrics[name]["wall_seconds"] for name in ("head", "finetune") if name in metrics}
    return {"plan": plan.to_dict(), "actual_seconds": round(total, 2), "actual_phase_seconds": actual,
            "budget_used": round(total / plan.budget_seconds, 4)}


def train_head(model: keras.Model, phase: datasets.PhaseData, config: Config, strategy, train_steps: int,
               state: checkpointing.RunState, board: summaries.RunSummaries | None = None,
               signals: guards.Signals | None = None, lengths: dict | None = None, clock=None) -> dict:
    """Phase 1: backbone frozen, only the head learns. Returns the phase's test metrics."""
    start = time.time()
    length = (lengths or phase_lengths(config, train_steps, None))["head"]
    with strategy.scope():
        classifier.freeze_backbone(model)
        cached = phase.model is not model  # The tiny head on stored features: many steps per call.
        per_call = _steps_per_execution(train_steps, state.step, config.save_every_steps,
                                        max(config.steps_per_execution, 16 if cached else 1),
                                        length.last_epoch_steps)
        compile_classifier(phase.model, config.head_learning_rate, config, model.output.shape[-1], per_call)
        if state.epoch or state.step:
            checkpointing.restore(config.model_dir, state, model, phase.model)
    logging.info("Phase 1 (head): %d trainable weights, %d epochs, training %s.",
                 len(model.trainable_weights), length.epochs, phase.model.name)
    summary = board and (lambda offset: board.phase_callback(1, model, 0, config.head_learning_rate, offset))
    divergence = _divergence("phase 1 (head)", train_steps, config.head_learning_rate,
                             ("head_learning_rate", config.head_learning_rate))
    _fit(model, phase, config, train_steps, state, length, summary, divergence, signals, clock)
    return _phase_metrics(phase, config, start, 1, length.epochs - 1, board, length.steps(train_steps))


def fine_tune(model: keras.Model, phase: datasets.PhaseData, config: Config, strategy, train_steps: int,
              state: checkpointing.RunState, board: summaries.RunSummaries | None = None,
              signals: guards.Signals | None = None, lengths: dict | None = None, clock=None) -> dict:
    """Phase 2: unfreeze from fine_tune_at, recompile with a fresh, low, warmed-up cosine schedule."""
    start = time.time()
    lengths = lengths or phase_lengths(config, train_steps, None)
    first, length = lengths["head"].epochs, lengths["finetune"]
    with strategy.scope():
        classifier.unfreeze_backbone(model, config.fine_tune_at)
        per_call = _steps_per_execution(train_steps, state.step, config.save_every_steps,
                                        config.steps_per_execution, length.last_epoch_steps)
        schedule = finetune_schedule(config, train_steps, length.steps(train_steps))
        compile_classifier(phase.model, schedule, config, model.output.shape[-1], per_call)
        if state.epoch > first or (state.epoch == first and state.step):
            checkpointing.restore(config.model_dir, state, model, phase.model)
    logging.info("Phase 2 (fine-tune): %d trainable weights, %d epochs from %s, training %s.",
                 len(model.trainable_weights), length.epochs, config.fine_tune_at, phase.model.name)
    state.epoch = max(state.epoch, first)
    summary = board and (lambda offset: board.phase_callback(2, model, first, schedule, offset))
    divergence = _divergence("phase 2 (finetune)", train_steps, schedule,
                             ("finetune_learning_rate", config.finetune_learning_rate))
    shifted = budget.Length(first + length.epochs, length.last_epoch_steps)
    _fit(model, phase, config, train_steps, state, shifted, summary, divergence, signals, clock)
    return _phase_metrics(phase, config, start, 2, shifted.epochs - 1, board, length.steps(train_steps))


def _divergence(phase: str, train_steps: int, learning_rate, flag: tuple):
    return lambda offset: guards.StopOnDivergence(phase, train_steps, learning_rate, flag, offset)


def _fit(model, phase: datasets.PhaseData, config: Config, train_steps: int, state, end: budget.Length,
         summary=None, divergence=None, signals: guards.Signals | None = None, clock=None):
    """fit() from the saved (epoch, step) to the end of epoch `end.epochs - 1`, whose last epoch has
    `end.last_epoch_steps` steps; a partly done epoch, and a short last one, get a fit() of their own.

    Each fit() gets its own callbacks, told through their constructors how many steps of the current
    epoch were done before it began. In order: the divergence check (before anything logs or saves a
    non-finite step), the summaries, the checkpoint (which saves only after the epoch has been
    logged), and the signal check (after the epoch's save).
    """
    signals = signals or guards.Signals()

    def save_mid_epoch(step: int):
        state.step = step
        if clock:
            state.elapsed_seconds = round(clock(), 2)
        checkpointing.save_state(config.model_dir, state, model, phase.model)

    def steps_in(epoch: int) -> int:
        return end.last_epoch_steps if epoch == end.epochs - 1 else train_steps

    while state.epoch < end.epochs:
        first, skip = state.epoch, state.step
        steps = steps_in(first)
        short_last = end.last_epoch_steps != train_steps
        last = first + 1 if skip or steps != train_steps else end.epochs - (1 if short_last else 0)
        callbacks = [divergence(skip)] if divergence else []
        callbacks += [summary(skip)] if summary else []
        callbacks.append(checkpointing.TrainingCheckpoint(model, config.model_dir, state, steps,
                                                          config.save_every_steps, step_offset=skip,
                                                          clock=clock))
        callbacks.append(guards.StopOnSignal(signals, save_mid_epoch, steps, step_offset=skip))
        with signals.defer():
            phase.model.fit(phase.train(first, skip), initial_epoch=first, epochs=last,
                            steps_per_epoch=steps - skip, validation_data=phase.validation,
                            validation_steps=config.eval_steps, callbacks=callbacks, shuffle=False,
                            verbose=2, class_weight=phase.class_weight)


def _phase_metrics(phase: datasets.PhaseData, config: Config, start: float, number: int, last_epoch: int,
                   board: summaries.RunSummaries | None, steps: int) -> dict:
    """The phase's test metrics, from the one evaluation path; the same pass feeds TensorBoard."""
    result = evaluation.evaluate(phase.model, phase.test, config.eval_steps, config.label_smoothing)
    metrics = evaluation.prefixed(result.metrics, "test")
    if board:
        board.write_phase_end(number, last_epoch, result, metrics)
    metrics["wall_seconds"] = round(time.time() - start, 2)
    metrics["steps"] = int(phase.model.optimizer.iterations.numpy())  # Run, not planned: a fresh
    # optimizer per phase counts this phase's steps, resumed ones included (the count is restored).
    if metrics["steps"] != steps:
        logging.warning("Phase %d ran %d steps where %d were planned.", number, metrics["steps"], steps)
    logging.info("Phase %d test accuracy %.4f (top-5 %.4f) after %.0f s.", number, metrics["test_accuracy"],
                 metrics["test_top5_accuracy"], metrics["wall_seconds"])
    return metrics


def finetune_schedule(config: Config, train_steps: int, total_steps: int | None = None):
    """Linear warmup to finetune_learning_rate, then cosine decay to zero at phase 2's last step (the
    planned one, with a budget: a schedule cut off mid-decay would waste the low-rate steps)."""
    total_steps = total_steps or config.finetune_epochs * train_steps
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


def _steps_per_execution(train_steps: int, skip: int, save_every: int | None, limit: int = 16,
                         last_epoch_steps: int | None = None) -> int:
    counts = [train_steps, train_steps - skip] + ([save_every] if save_every else [])
    if last_epoch_steps:
        counts += [last_epoch_steps, max(1, last_epoch_steps - skip)]
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
