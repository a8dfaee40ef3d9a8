"""--mode=train: the run's stages in order (schedule.py says what each trains), then the export.

A run is resumable: rerunning the same command with the same --model_dir carries on from the last
saved state (see checkpointing.py), at whichever stage and step it stopped.
"""

import os
import time

from absl import logging
import keras

from tl_keras.config import AUTO, Config
from tl_keras.errors import UserError
from tl_keras.model import classifier
from tl_keras.reporting import evaluation
from tl_keras.reporting import summaries
from tl_keras.serving import export as export_lib
from tl_keras.training import budget
from tl_keras.training import checkpointing
from tl_keras.training import datasets
from tl_keras.training import distribute
from tl_keras.training import ema
from tl_keras.training import exporting
from tl_keras.training import guards
from tl_keras.training import lr_finder
from tl_keras.training import multi_worker_compat
from tl_keras.training import run_dir
from tl_keras.training import schedule
from tl_keras.training.schedule import Stage


def train_and_export(config: Config, strategy, data: datasets.Data,
                     signals: guards.Signals | None = None, started: float | None = None) -> dict:
    """Every stage, then the export, each skipped if a previous attempt already finished it.

    `started` (time.monotonic()) is when this process began, so that a budget counts data preparation.
    """
    signals = signals or guards.Signals()
    stages = schedule.build_stages(config)
    state = checkpointing.load_state(config.model_dir) or checkpointing.RunState()
    _convert_two_phase_state(state, stages)
    clock = budget.Clock(state.elapsed_seconds, started)
    if state.save_id or state.epoch:
        logging.info("Resuming %s: %s, %d epochs and %d steps done.", config.model_dir,
                     stages[state.stage].label if state.stage < len(stages) else state.status, state.epoch,
                     state.step)
        summaries.trim_logs(os.path.join(config.model_dir, run_dir.LOG_DIR), state.epoch,
                            state.epoch * data.train_steps + state.step)
    with strategy.scope():
        model = build(config, data.splits.num_classes, strategy, config.weights)
        if state.save_id:
            checkpointing.restore(config.model_dir, state, model)
    for stage in stages:
        if stage.fine_tunes:  # A bad layer name fails now, not after the stages before it.
            classifier.unfreeze_start(model, stage.trains_from)
    if config.early_stopping_patience and data.validation is None:
        raise UserError("--early_stopping_patience watches validation accuracy, and this run has no "
                        "validation split. Received: validation_split=0.0")
    cache = None
    if datasets.use_feature_cache(config):
        if multi_worker_compat.needed(strategy):
            logging.info("Feature caching is off under multi-worker training: each worker would extract.")
        else:
            cache = datasets.open_feature_cache(config, data)
    plan = _plan(config, strategy, data, stages, state, clock) if config.time_budget and stages else None
    lengths = stage_lengths(stages, data.train_steps, plan)
    metrics = _convert_two_phase_metrics(run_dir.read_metrics(config.model_dir))
    board = summaries.RunSummaries(config, data.splits, data.train_steps)
    if not (state.save_id or state.epoch):
        board.write_run_start(plan.describe() if plan else None)

    try:
        while state.status == "train" and state.stage < len(stages):
            stage = stages[state.stage]
            state.stage_name = stage.name
            peak = _peak_rate(stage, model, config, strategy, data, state, metrics)  # Before the steps are
            # set again below, so that an 'auto' range test's time counts against the budget.
            if plan and stage is stages[-1] and not plan.last_stage_fixed:
                plan, lengths = _fix_last_stage(plan, config, data, stages, state, clock)
            stage_data = datasets.stage_data(model, config, strategy, data, cache, stage.fine_tunes, signals)
            metrics.setdefault("stages", {})[stage.name] = train_stage(
                model, stage_data, stage, stages, config, strategy, data.train_steps, state, peak, board,
                signals, lengths, clock, test_images=data.test)
            run_dir.update_metrics(config.model_dir, {"stages": metrics["stages"]})
            _next_stage(config, state, model if config.early_stopping_patience else None, stages)
        if state.status == "train":  # No stages at all: straight to the export.
            state.status = "export"
    finally:
        board.close()  # Each epoch flushes, so a crash loses at most the current epoch's points.
    if state.status == "export":
        _export(model, config, data, state, metrics, plan, clock)
    return metrics


def _export(model: keras.Model, config: Config, data: datasets.Data, state: checkpointing.RunState,
            metrics: dict, plan: budget.Plan | None, clock):
    """The accuracy gate, then calibration, every format and their parity checks; a resume that
    finds the export done keeps it. Updates `metrics` and metrics.json, and marks the run done."""
    if config.min_accuracy is not None:
        final = list(metrics.get("stages", {}).values())
        exporting.check_min_accuracy(config, final[-1] if final else None, model, data.test,
                                     data.eval_steps)
    if not state.export_dir:
        state.export_dir = export_lib.next_version_dir(os.path.join(config.model_dir, run_dir.EXPORT_DIR))
        checkpointing.save_state(config.model_dir, state)
    checkpointing.save_weights(
        model, os.path.join(checkpointing.checkpoint_dir(config.model_dir), checkpointing.LATEST))
    exported = exporting.calibrate_and_export(model, config, data.splits, state.export_dir,
                                              summary_step=max(0, state.epoch - 1))
    metrics.update(exported)
    run_dir.update_metrics(config.model_dir, exported)
    if plan:
        metrics["budget"] = _budget_report(plan, metrics, clock())
        run_dir.update_metrics(config.model_dir, {"budget": metrics["budget"]})
        logging.info("Budget %s: used %s.", budget.minutes(plan.budget_seconds),
                     budget.minutes(metrics["budget"]["actual_seconds"]))
    state.status = "done"
    state.elapsed_seconds = round(clock(), 2)
    checkpointing.save_state(config.model_dir, state)


def build(config: Config, num_classes: int, strategy, weights: str) -> keras.Model:
    """The classifier as the flags describe it; call inside strategy.scope()."""
    return classifier.build_classifier(
        config.backbone, config.image_size, num_classes, weights, config.head_units, config.head_batchnorm,
        config.dropout, matmul_small_convs=distribute.computes_on_cpu(strategy),
        backbone_bn=config.backbone_bn)


def _next_stage(config: Config, state: checkpointing.RunState, model: keras.Model | None,
                stages: list[Stage]):
    """Record that the stage in progress has finished. With early stopping the model now holds the
    stage's best weights, not its last epoch's: they are saved with the state, so a resume from here
    starts the next stage from them."""
    state.stage, state.step = state.stage + 1, 0
    state.stage_best_value, state.stage_wait, state.stage_stopped = None, 0, False
    if state.stage == len(stages):
        state.status, state.stage_name = "export", ""
    else:
        state.stage_name = stages[state.stage].name
    checkpointing.save_state(config.model_dir, state, model)
    stage_best = os.path.join(checkpointing.checkpoint_dir(config.model_dir), checkpointing.STAGE_BEST)
    if os.path.exists(stage_best):
        os.remove(stage_best)


def _convert_two_phase_state(state: checkpointing.RunState, stages: list[Stage]):
    """A state.json of the two-phase version names its phase head|finetune|export|done; the two-phase
    recipe's stages carry those names, so such a run resumes where it was."""
    if state.phase is None:
        return
    phase, state.phase = state.phase, None
    if phase in ("export", "done"):
        state.status, state.stage = phase, len(stages)
        return
    names = [stage.name for stage in stages]
    if phase not in names:
        raise UserError(f"This model_dir was saved in phase {phase} of the two-phase version, and the "
                        f"flags now give the stages {', '.join(names)}; rerun it with its own "
                        f"flags.txt, or pass --overwrite. Received: phase={phase}")
    state.stage, state.stage_name = names.index(phase), phase


def _convert_two_phase_metrics(metrics: dict) -> dict:
    """metrics.json of the two-phase version kept each phase's metrics under its name."""
    old = {name: metrics.pop(name) for name in (schedule.HEAD, schedule.FINETUNE) if name in metrics}
    if old and "stages" not in metrics:
        metrics["stages"] = old
    return metrics


def stage_lengths(stages: list[Stage], train_steps: int, plan: budget.Plan | None) -> dict:
    """Each stage's budget.Length, by name: from the epoch flags, or from a --time_budget plan."""
    if plan is None:
        return {stage.name: budget.Length(stage.epochs, train_steps) for stage in stages}
    return {stage.name: budget.Length.of_steps(plan.steps(stage.name), train_steps) for stage in stages}


def _plan(config: Config, strategy, data: datasets.Data, stages: list[Stage], state, clock) -> budget.Plan:
    """The run's plan: made once, from speeds measured now, and kept in the state for every resume."""
    if state.plan:
        plan = budget.Plan.from_dict(state.plan)
        logging.info("Keeping the plan made when the run began. %s.", plan.describe())
        return plan
    rates = _measure_rates(config, strategy, data, stages)
    validation, test = _evaluated_examples(config, data)
    formats = exporting.export_formats(config)
    plan = budget.make_plan(config.time_budget_seconds, clock(), data.train_steps, config.batch_size,
                            validation, test, rates, [(stage.name, stage.epochs) for stage in stages],
                            budget.export_seconds(len(formats) - 1, _export_examples(config, data),
                                                  rates.inference))
    logging.info("%s.", plan.describe())
    _store_plan(plan, config, state, clock)
    return plan


def _evaluated_examples(config: Config, data: datasets.Data) -> tuple[int, int]:
    """(validation, test) images that one evaluation pass runs through the model: all, or --eval_steps
    batches; a stage's test pass runs each image twice with --tta=flip."""
    views = 2 if evaluation.tta_of(config.tta) else 1
    return _capped(config, data.splits.num_validation), _capped(config, data.splits.num_test) * views


def _export_examples(config: Config, data: datasets.Data) -> int:
    """Images the export runs through a model: calibration's validation pass, the report's test pass,
    then each format's parity pass; all of them twice with --export_tta."""
    test = _capped(config, data.splits.num_test)
    checked = min(test, config.parity_examples) if config.parity_examples else test
    read = _capped(config, data.splits.num_validation) + test + checked * len(exporting.export_formats(config))
    return read * (2 if config.export_tta else 1)


def _capped(config: Config, examples: int) -> int:
    return min(examples, config.eval_steps * config.batch_size) if config.eval_steps else examples


def _store_plan(plan: budget.Plan, config: Config, state, clock):
    state.plan = plan.to_dict()
    state.elapsed_seconds = round(clock(), 2)
    checkpointing.save_state(config.model_dir, state)


def _fix_last_stage(plan: budget.Plan, config: Config, data: datasets.Data, stages, state, clock):
    """The last stage's steps from the time actually left when it starts; stored, so a resume keeps them."""
    fixed = plan.fix_last(clock(), *_evaluated_examples(config, data), config.batch_size)
    last = stages[-1].name
    logging.info("The last stage (%s) starts %s into the budget: %d steps (%.2f epochs; planned %.2f).",
                 last, budget.minutes(clock()), fixed.steps(last), fixed.epochs(last), plan.epochs(last))
    _store_plan(fixed, config, state, clock)
    return fixed, stage_lengths(stages, data.train_steps, fixed)


def _measure_rates(config: Config, strategy, data: datasets.Data, stages: list[Stage]) -> budget.Rates:
    """A few timed steps of each stage's kind on a throwaway copy of the classifier, so that the
    run's own weights and optimizer never see them."""
    classes = data.splits.num_classes
    with strategy.scope():
        probe = build(config, classes, strategy, "none")
    train, setup = {}, {}
    for stage in stages:
        with strategy.scope():
            if stage.fine_tunes:
                classifier.unfreeze_backbone(probe, stage.trains_from)
            else:
                classifier.freeze_backbone(probe)
            rate = stage.learning_rate if stage.learning_rate != AUTO else 1e-4
            schedule.compile_classifier(probe, rate, config, classes,
                                        layerwise=probe if stage.fine_tunes else None)
        measured = budget.measure_train_rate(probe, data.train(0, 0), config.batch_size)
        train[stage.name], setup[stage.name] = measured[0], round(measured[1], 2)
    inference = budget.measure_inference_rate(probe, data.test.repeat(), config.batch_size)
    logging.info("Measured: %s, inference %.0f img/s.",
                 ", ".join(f"{name} {rate:.0f} img/s" for name, rate in train.items()), inference)
    return budget.Rates(train=train, inference=inference, setup=setup)


def _budget_report(plan: budget.Plan, metrics: dict, total: float) -> dict:
    """The plan beside what happened, for metrics.json."""
    actual = {name: stage["wall_seconds"] for name, stage in metrics.get("stages", {}).items()}
    return {"plan": plan.to_dict(), "actual_seconds": round(total, 2), "actual_stage_seconds": actual,
            "budget_used": round(total / plan.budget_seconds, 4)}


def _peak_rate(stage: Stage, model: keras.Model, config: Config, strategy, data: datasets.Data, state,
               metrics: dict) -> float:
    """The stage's peak learning rate; for 'auto', the range test's suggestion, found from the weights
    the stage starts with, once, and kept in the state so that a resume uses the same rate."""
    key = schedule.rate_key(stage)
    if stage.learning_rate == AUTO and key not in state.learning_rates:
        finding = find_learning_rate(model, stage, config, strategy, data)
        state.learning_rates[key] = finding.suggestion
        checkpointing.save_state(config.model_dir, state)
        logging.info("--%s_learning_rate=auto chose %.3g for %s (%s).", key, finding.suggestion, stage.label,
                     finding.rule)
    if state.learning_rates:
        metrics["learning_rates"] = dict(state.learning_rates)
        run_dir.update_metrics(config.model_dir, {"learning_rates": metrics["learning_rates"]})
    return schedule.resolved_rate(stage, state.learning_rates)


def find_learning_rate(model: keras.Model, stage: Stage, config: Config, strategy, data: datasets.Data,
                       directory: str | None = None):
    """The range test for `stage`, on a copy of `model` (its weights as they are now), so that the run's
    own weights, optimizer and RNG never see it. Writes NAME.png and NAME.json to `directory`
    (default: model_dir/lr_find)."""
    classes = data.splits.num_classes
    with strategy.scope():
        probe = build(config, classes, strategy, "none")
        probe.set_weights(model.get_weights())
        if stage.fine_tunes:
            classifier.unfreeze_backbone(probe, stage.trains_from)
        else:
            classifier.freeze_backbone(probe)

    def compile_fn(target, learning_rate):
        with strategy.scope():
            schedule.compile_classifier(target, learning_rate, config, classes,
                                        layerwise=target if stage.fine_tunes else None)

    logging.info("Learning-rate range test for %s: up to %d steps.", stage.label, config.lr_find_steps)
    finding = lr_finder.find(probe, data.train(0, 0), compile_fn, steps=config.lr_find_steps)
    paths = lr_finder.write_finding(finding, directory or os.path.join(config.model_dir, run_dir.LR_FIND_DIR),
                                    stage.name)
    logging.info("Range test for %s: suggested learning rate %.3g (%s); plot in %s.", stage.label,
                 finding.suggestion, finding.rule, paths.get("png"))
    return finding


def run_lr_find(config: Config, strategy, data: datasets.Data) -> dict:
    """--mode=lr_find: the range test of one stage, from the backbone's weights and a fresh head. It
    writes model_dir/lr_find/ and nothing else: no checkpoint, no state, no metrics.json."""
    stages = schedule.build_stages(config)
    names = [stage.name for stage in stages]
    name = config.lr_find_stage or (names[0] if names else None)
    if name not in names:
        raise UserError(f"--lr_find_stage must name one of this run's stages ({', '.join(names) or 'none'}). "
                        f"Received: lr_find_stage={config.lr_find_stage}")
    stage = stages[names.index(name)]
    with strategy.scope():
        model = build(config, data.splits.num_classes, strategy, config.weights)
    if stage.fine_tunes:
        classifier.unfreeze_start(model, stage.trains_from)
    finding = find_learning_rate(model, stage, config, strategy, data)
    return {"lr_find": dict(finding.to_dict(), stage=stage.name)}


def train_stage(model: keras.Model, stage_data: datasets.StageData, stage: Stage, stages: list[Stage],
                config: Config, strategy, train_steps: int, state: checkpointing.RunState, peak: float,
                board: summaries.RunSummaries | None = None, signals: guards.Signals | None = None,
                lengths: dict | None = None, clock=None, test_images=None) -> dict:
    """Train one stage: set its trainable layers, recompile with a fresh optimizer at its learning rate
    or schedule, fit from wherever the state says, and return its test metrics.

    With --ema_decay the stage ends with its averaged weights in `model`, saved with the state, so that
    the next stage (or a resume) starts from them. With --tta, a stage that trained on cached
    activations is tested by the classifier on `test_images` (the image test batches): a mirrored
    activation is not the activation of a mirrored image."""
    start = time.time()
    lengths = lengths or stage_lengths(stages, train_steps, None)
    first = sum(lengths[s.name].epochs for s in stages[:stage.index])
    length = lengths[stage.name]
    steps = {s.name: lengths[s.name].steps(train_steps) for s in stages}
    rate = schedule.learning_rate(stage, stages, steps, config, train_steps, peak)
    with strategy.scope():
        if stage.fine_tunes:
            classifier.unfreeze_backbone(model, stage.trains_from)
        else:
            classifier.freeze_backbone(model)
        cached_head = stage_data.model is not model and not stage.fine_tunes  # Many tiny steps per call.
        per_call = _steps_per_execution(train_steps, state.step, config.save_every_steps,
                                        max(config.steps_per_execution, 16 if cached_head else 1),
                                        length.last_epoch_steps)
        schedule.compile_classifier(stage_data.model, rate, config, model.output.shape[-1], per_call,
                                    layerwise=model if stage.fine_tunes else None)
        if state.epoch > first or (state.epoch == first and state.step):
            checkpointing.restore(config.model_dir, state, model, stage_data.model)
    logging.info("%s: %d trainable weights, %d epochs%s, training %s.", stage.label.capitalize(),
                 len(model.trainable_weights), length.epochs,
                 f" from {stage.trains_from}" if stage.fine_tunes else "", stage_data.model.name)
    if config.ema_decay:
        ema.warn_if_short(config.ema_decay, steps[stage.name], stage.label.capitalize())
    state.epoch = max(state.epoch, first)
    summary = board and (lambda offset: board.stage_callback(stage.index, stage.name, model, first, rate,
                                                             offset))
    flag = (f"{schedule.rate_key(stage)}_learning_rate", peak)
    divergence = (lambda offset: guards.StopOnDivergence(stage.label, train_steps, rate, flag, offset))
    stopper = None
    stage_best = os.path.join(checkpointing.checkpoint_dir(config.model_dir), checkpointing.STAGE_BEST)
    if config.early_stopping_patience and stage_data.validation is not None:
        def save_best():
            with ema.averaged(stage_data.model.optimizer):  # What validation measured.
                checkpointing.save_weights(model, stage_best)

        stopper = guards.StopWhenNotImproving(state, config.early_stopping_patience, save_best)
    end = budget.Length(first + length.epochs, length.last_epoch_steps)
    _fit(model, stage_data, config, train_steps, state, end, summary, divergence, stopper, signals, clock)
    ran = int(stage_data.model.optimizer.iterations.numpy())  # Run, not planned: a fresh optimizer per
    # stage counts this stage's steps, resumed ones included (the count is restored).
    averaged = config.ema_decay and ema.use_average(stage_data.model.optimizer)  # As the last fit() ended;
    # a resumed stage whose epochs had all run has no fit() to do it.
    if stopper and os.path.exists(stage_best):
        model.load_weights(stage_best)  # It holds that epoch's optimizer too: read `ran` before.
        logging.info("%s: back to its best weights (validation accuracy %.4f).", stage.label.capitalize(),
                     state.stage_best_value)
    if averaged:  # The state's weights are the raw ones of the last epoch; the next stage starts here.
        checkpointing.save_state(config.model_dir, state, model, stage_data.model)
    return _stage_metrics(stage_data, config, start, stage, end.epochs - 1, board, steps[stage.name], ran,
                          state.stage_stopped, model, test_images)


def _fit(model, stage_data: datasets.StageData, config: Config, train_steps: int, state, end: budget.Length,
         summary=None, divergence=None, stopper=None, signals: guards.Signals | None = None, clock=None):
    """fit() from the saved (epoch, step) to the end of epoch `end.epochs - 1`, whose last epoch has
    `end.last_epoch_steps` steps; a partly done epoch, and a short last one, get a fit() of their own.

    Each fit() gets its own callbacks, told through their constructors how many steps of the current
    epoch were done before it began. In order: the divergence check (before anything logs or saves a
    non-finite step), the summaries, early stopping (which updates the state that is saved next), the
    checkpoint (which saves only after the epoch has been logged), and the signal check (after the
    epoch's save). An early stop ends the stage: its remaining epochs are skipped.
    """
    signals = signals or guards.Signals()

    def save_mid_epoch(step: int):
        state.step = step
        if clock:
            state.elapsed_seconds = round(clock(), 2)
        checkpointing.save_state(config.model_dir, state, model, stage_data.model)

    def steps_in(epoch: int) -> int:
        return end.last_epoch_steps if epoch == end.epochs - 1 else train_steps

    averaging = ema.enabled(stage_data.model.optimizer)
    while state.epoch < end.epochs and not state.stage_stopped:
        first, skip = state.epoch, state.step
        steps = steps_in(first)
        short_last = end.last_epoch_steps != train_steps
        last = first + 1 if skip or steps != train_steps else end.epochs - (1 if short_last else 0)
        training_weights = ema.TrainingWeights() if averaging else None
        callbacks = [ema.SwapForEvaluation()] if averaging else []
        callbacks += [divergence(skip)] if divergence else []
        callbacks += [summary(skip)] if summary else []
        callbacks += [stopper] if stopper else []
        callbacks.append(checkpointing.TrainingCheckpoint(model, config.model_dir, state, steps,
                                                          config.save_every_steps, step_offset=skip,
                                                          clock=clock))
        callbacks.append(guards.StopOnSignal(signals, save_mid_epoch, steps, step_offset=skip))
        callbacks += [training_weights] if training_weights else []
        with signals.defer():
            stage_data.model.fit(stage_data.train(first, skip), initial_epoch=first, epochs=last,
                                 steps_per_epoch=steps - skip, validation_data=stage_data.validation,
                                 validation_steps=config.eval_steps, callbacks=callbacks, shuffle=False,
                                 verbose=2, class_weight=stage_data.class_weight)
        if training_weights and state.epoch < end.epochs and not state.stage_stopped:
            training_weights.restore()  # fit() ended with the averages; this stage trains on.
    if state.stage_stopped:
        state.epoch, state.step = end.epochs, 0  # Later stages keep their place on the epoch axis.


def _stage_metrics(stage_data: datasets.StageData, config: Config, start: float, stage: Stage,
                   last_epoch: int, board: summaries.RunSummaries | None, steps: int, ran: int,
                   stopped: bool, classifier_model: keras.Model | None = None, test_images=None) -> dict:
    """The stage's test metrics, from the one evaluation path; the same pass feeds TensorBoard.

    With --tta the metrics are those of the averaged views, marked as such, with the single view's
    beside them (evaluation.split_metrics). TTA needs images: a stage on cached activations is tested
    by the classifier on `test_images`, or without TTA (said in the log and the metrics) if none."""
    model, test, tta = stage_data.model, stage_data.test, evaluation.tta_of(config.tta)
    if tta and model is not classifier_model:
        if classifier_model is not None and test_images is not None:
            model, test = classifier_model, test_images
        else:
            logging.warning("%s trained on cached activations and has no test images to mirror: its test "
                            "metrics are of single views, not --tta=%s.", stage.label.capitalize(), tta)
            tta = None
    result = evaluation.evaluate(model, test, config.eval_steps, config.label_smoothing, tta)
    metrics = evaluation.split_metrics(result, "test")
    if board:
        board.write_stage_end(stage.index, stage.name, last_epoch, result, metrics)
    metrics["index"] = stage.index
    metrics["wall_seconds"] = round(time.time() - start, 2)
    metrics["steps"] = ran
    if stopped:
        metrics["stopped_early"] = True
    elif metrics["steps"] != steps:
        logging.warning("%s ran %d steps where %d were planned.", stage.label.capitalize(), metrics["steps"],
                        steps)
    views = f", averaged over {result.tta} views (single view {metrics['single_view_test_accuracy']:.4f})" \
        if result.tta else ""
    logging.info("%s test accuracy %.4f (top-5 %.4f%s) after %.0f s.", stage.label.capitalize(),
                 metrics["test_accuracy"], metrics["test_top5_accuracy"], views, metrics["wall_seconds"])
    return metrics


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
