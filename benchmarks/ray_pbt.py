"""Ray Tune's PopulationBasedTraining as the external reference for the schedule suite (method `pbt_ray`).

`run_ray_pbt` gives Ray the clan's budget and scores the result the way `schedule_suite.run_job` scores every other
method:

- P = `settings.num_processes` trials run concurrently, each a plain `transformers.Trainer` training
  `settings.steps` optimizer steps of `settings.per_device_batch` samples, evaluated on the validation split every
  `settings.round_steps` steps. Each report is a PBT perturbation point (`perturbation_interval=round_steps` on the
  trial's optimizer step).
- PBT mutates the problem's clan genes (`problem.genes`) within the bounds the clan uses (`clantune_hf.genes`:
  `default_bounds`, overridden per gene by `low`/`high`), log-uniform for log-scale genes, uniform for linear ones,
  log-uniform from a thousandth of the high bound for log1p ones (weight decay).
  Ray's defaults otherwise (quantile_fraction 0.25, resample_probability 0.25, perturbation factors 1.2 and 0.8)
  but one: PBT runs synchronously (`_pbt`). In Ray's default asynchronous mode a trial that clones another jumps
  to the donor's step, ahead or behind its own, so the steps trained drift from P x steps (1125 and 1300 of 1200
  on lm_lr_low and cls_overfit at the quick budget) and lineages skip or repeat steps; synchronous PBT perturbs
  every trial at the same step, like the clan's rounds, and trains exactly P x steps. Ray's multiplicative
  perturbation knows no bounds, so an explore hook clips each gene back into them (an adam_beta2 of 0.999 * 1.2
  would otherwise crash AdamW).
- Initial configurations: trial 0 starts at the problem's mis-set start (as every other method does); trials 1..P-1
  are sampled from the search space, Ray's usual way (the clan likewise spreads members 1..P-1 across the bounds).
- Data: each trial draws its own shuffle of the training split (`data_seed` = seed + trial index); a trial cloned
  from another resumes at the donor's step, in its own shuffle.
- A trial that exploits another resumes the donor's `Trainer` checkpoint (weights, AdamW state, scheduler, step)
  and then expresses its new genes on the restored optimizer and scheduler with `clantune_hf.expression.express`,
  the code the clan uses: loading an optimizer state dict would otherwise silently bring back the donor's learning
  rate, weight decay and betas.
- Diverged trials report an infinite loss, not NaN: PBT sorts trials by score, and NaN breaks the sort.
- Ranking: on the validation loss, or on the problem's `metric_key` (its `compute_metrics`) where it has one, with
  mode "max" when `greater_is_better`, as the clan ranks its members.
- Scoring: the best trial by its last reported validation metric; its final checkpoint is loaded into a fresh model
  and scored with the problem's scorer (`bench_utils.mean_loss` unless the problem sets `scorer`) on the test split
  (`fitness`) and on the validation split (`val_fitness`).
  `lr_schedule` follows that trial's lineage (recorded in every checkpoint), one learning rate per optimizer step.

Ray starts its own worker processes, so this is one launch, not P ranks: `run_ray_pbt` is meant to run in a process
of its own (`bench_utils.launch` forks one). It starts a private local Ray instance (`address="local"`), never
joining one another benchmark started, and shuts it down at the end.

Cost: stock synchronous PBT pauses every trial at every perturbation point until the last one gets there, and Ray
stops a paused trial's worker process and restarts it later from its checkpoint in a fresh process, which imports
torch and transformers again (about 5 s on a loaded 2-core machine; 48 restarts of 4 trials at the quick budget, most
of the wall time). `reuse_actors` alone does not help: Ray 2.60's TuneController keeps a stopped trial's actor for
the next trial to start only while the search algorithm may still add trials (or a trial waits for resources), never
the case once all P trials run. So `_pbt` changes how trials wait and restart, not what they train:
- A trial that reaches a perturbation point before the others waits there in its own process, blocked in
  `tune.report` (idle, as a paused trial), instead of being paused. Once all have reported, PBT exploits and
  explores as stock PBT does, and the trials it does not clone into train on in their processes (stock PBT restarts
  them from their own checkpoints, to the same state).
- A trial PBT clones into (its bottom quantile: 1 of 4) is paused and restarted from the donor's checkpoint in its
  own worker process, reset, with torch and transformers already imported (`reuse_actors`, the search algorithm
  kept unfinished until the trial has restarted). Ray keeps one such process at a time: where PBT clones into more
  than one trial a round (P > 4), the others start fresh processes.
So at P = 4 only the first P starts import torch and transformers. `_pbt` reaches into the internals of Ray's
TuneController and PBT (written against Ray 2.60): a Ray with other internals fails the run, or merely restarts more
processes. `result.json` reports the starts (`trial_starts`, a reused process's included) and the seconds they took
(`startup_s`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# Ray keeps this many checkpoints per trial (None: all). PBT restores a donor's checkpoint some seconds after
# choosing it, while the donor trains on: keeping only the newest few can delete it first (it did with 4, once in a
# 40-round run). The suite's models are small, so every checkpoint is kept; the run's directory is removed after.
NUM_TO_KEEP = None
# Trainer output directories of running trials. Ray kills a stopped trial's process, so `run_ray_pbt` removes
# what those leave behind.
SCRATCH = "trainer_tmp"
# Object store size: trials pass no large objects, so the default (30% of RAM) would only reserve shared memory.
OBJECT_STORE_BYTES = 128 * 1024**2


def gene_space(problem, settings) -> tuple[dict, dict, dict]:
    """`(start, bounds, space)` for the problem's clan genes: the start values the clan would begin from, each gene's
    `(low, high)` bounds, and the Ray search space over them."""
    from ray import tune
    from schedule_suite import _training_fields
    from transformers import TrainingArguments

    from clantune_hf.dropout import mean_dropout
    from clantune_hf.genes import LOG1P_FLOOR, build_gene, parse_gene_options

    fields, model_kwargs = _training_fields(problem, {}, settings)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}
    start, bounds, space = {}, {}, {}
    for name, options in parse_gene_options(problem.genes).items():
        if name == "dropout":
            # Like ClanTrainer: the model's configured dropout when the problem's start does not set one.
            value = model_kwargs.get("dropout", None)
            value = mean_dropout(problem.make_model(settings, **model_kwargs)) if value is None else value
        else:
            value = fields.get(name, defaults[name])
        gene = build_gene(name, float(value), options)
        start[name], bounds[name] = gene.value, (gene.low, gene.high)
        if gene.scale == "log1p":  # Ray has no log1p domain: log-uniform down to where the clan's scale turns linear
            space[name] = tune.loguniform(max(gene.low, LOG1P_FLOOR * gene.high), gene.high)
        else:
            space[name] = (tune.loguniform if gene.scale == "log" else tune.uniform)(gene.low, gene.high)
    return start, bounds, space


def _pbt(start: dict, seed: int, **kwargs):
    """`(scheduler, search_alg)` for `tune.TuneConfig`: Ray's synchronous `PopulationBasedTraining` (given `kwargs`)
    and `BasicVariantGenerator` (trying `start` first), changed to restart fewer trial processes (see the module
    docstring): a trial that reaches a perturbation point before the others waits for them in its own process instead
    of being paused, and a trial PBT clones into restarts in its own process, reset, instead of a fresh one."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    class Search(BasicVariantGenerator):
        # With `reuse_actors`, Ray keeps a stopped trial's actor for the next trial to start only while the search
        # may add trials (or a trial waits for resources): not finished while PBT restarts the trials it cloned into.
        restarting = False

        def is_finished(self):
            return super().is_finished() and not self.restarting

    class WaitingPBT(PopulationBasedTraining):
        def __init__(self, **kwargs):
            # Synchronous: every trial trains exactly `steps` steps and is perturbed at the same steps.
            super().__init__(synch=True, **kwargs)
            self.waiting: list = []

        def on_trial_result(self, tune_controller, trial, result):
            tune_controller.search_alg.restarting = True  # until choose_trial_to_run has restarted them all
            barrier = self._next_perturbation_sync  # the step PBT waits for every trial to reach
            decision = super().on_trial_result(tune_controller, trial, result)
            if self._next_perturbation_sync == barrier:  # the others have not all reached it yet
                if decision != TrialScheduler.PAUSE:
                    return decision
                self.waiting.append(trial)
                return TrialScheduler.NOOP  # no next `train` call: the trial stays blocked in `tune.report`
            # This was the last trial to arrive, and PBT has exploited and explored. Stock PBT leaves every trial
            # paused, to restart it later; here only the trials it cloned into are, the others train on.
            controller = tune_controller._tune_controller  # schedulers get a wrapper around the TuneController
            for waiting in self.waiting:
                if waiting.status == Trial.RUNNING:
                    controller._schedule_trial_train(waiting)
                else:
                    # Cloned into while its last save was in flight: Ray then leaves a STOP queued for after that
                    # save, whose answer it drops; the STOP would stop the restarted trial at its first save.
                    controller._cached_trial_decisions.pop(waiting.trial_id, None)
            self.waiting = []
            return TrialScheduler.CONTINUE if decision == TrialScheduler.PAUSE else decision

        def choose_trial_to_run(self, tune_controller):
            trial = super().choose_trial_to_run(tune_controller)
            if trial is None:  # no paused trial left to restart
                tune_controller.search_alg.restarting = False
            return trial

    return WaitingPBT(**kwargs), Search(points_to_evaluate=[start], random_state=seed)


def _metric(problem) -> tuple[str, str]:
    """The validation metric PBT ranks trials on, and its mode: the problem's `metric_key` (a `compute_metrics` key,
    as the clan ranks members) or else the loss. `getattr`: a `Problem` without those fields ranks on the loss."""
    key = getattr(problem, "metric_key", None) or "loss"
    return f"eval_{key}", "max" if problem.greater_is_better else "min"


def _scorer(problem):
    """How the suite scores every method's final model: the problem's `scorer`, or else `mean_loss`."""
    from bench_utils import mean_loss

    return getattr(problem, "scorer", None) or mean_loss


def _trial(config: dict, problem_name: str, settings_dict: dict, job_dir: str) -> None:
    """One PBT trial: a `Trainer` that reports (and checkpoints) every round, resuming a checkpoint when PBT has
    cloned another trial into this one."""
    began = time.time()
    import torch
    from ray import tune
    from schedule_suite import ALL_PROBLEMS, Settings, _training_fields
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from clantune_hf.expression import check_expressible, decay_groups, express

    # Ray workers are spawned by the raylet, not by `launch`: one thread each, like every other run of the suite.
    torch.set_num_threads(1)
    settings = Settings(**settings_dict)
    problem = ALL_PROBLEMS[problem_name]
    metric, mode = _metric(problem)
    genes = dict(config)
    trial_id = tune.get_context().get_trial_id()
    index = int(trial_id.rsplit("_", 1)[-1])

    train, val, _ = problem.make_data(settings)
    fields, model_kwargs = _training_fields(problem, {}, settings)
    fields.update({name: value for name, value in genes.items() if name != "dropout"})
    if "dropout" in genes:
        model_kwargs["dropout"] = genes["dropout"]
    model = problem.make_model(settings, **model_kwargs)

    restored = tune.get_checkpoint()
    resume = restored.as_directory() if restored is not None else contextlib.nullcontext()
    scratch = os.path.join(job_dir, SCRATCH)
    with tempfile.TemporaryDirectory(dir=scratch, prefix="trial_") as output_dir, resume as resume_dir:
        lineage = []
        if resume_dir is not None:
            with open(os.path.join(resume_dir, "lineage.json")) as f:
                lineage = json.load(f)

        args = TrainingArguments(
            output_dir=output_dir, max_steps=settings.steps, seed=settings.seed, data_seed=settings.seed + index,
            report_to="none", logging_strategy="no", disable_tqdm=True, per_device_eval_batch_size=64, use_cpu=True,
            per_device_train_batch_size=settings.per_device_batch, eval_strategy="steps",
            eval_steps=settings.round_steps, save_strategy="steps", save_steps=settings.round_steps, **fields,
        )  # fmt: skip
        trainer = Trainer(
            model=model, args=args, train_dataset=train, eval_dataset=val,
            compute_metrics=getattr(problem, "compute_metrics", None),
        )  # fmt: skip
        ready = time.time()

        class Report(TrainerCallback):
            """Express the genes on a resumed optimizer; evaluate and save at the last step; report each save."""

            start_step = last_step = 0
            metrics: dict = {}

            def on_train_begin(self, args, state, control, **kwargs):
                # Runs after the Trainer restored the donor's optimizer and scheduler states, which carry the
                # donor's hyperparameters. Trainer builds every param group at args.learning_rate, so that is
                # each group's schedule base.
                self.start_step = self.last_step = state.global_step
                check_expressible(trainer, genes)
                bases = [args.learning_rate] * len(trainer.optimizer.param_groups)
                express(trainer, genes, bases, decay_groups(trainer))

            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step >= state.max_steps:  # the last step need not end a round
                    control.should_evaluate = control.should_save = True

            def on_evaluate(self, args, state, control, metrics=None, **kwargs):
                self.metrics = dict(metrics or {})

            def on_save(self, args, state, control, **kwargs):
                path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
                segments = [dict(s) for s in lineage]
                if segments and segments[-1]["genes"] == genes and segments[-1]["end_step"] == self.start_step:
                    segments[-1]["end_step"] = state.global_step  # paused and resumed unchanged: one segment
                else:
                    segments.append({"start_step": self.start_step, "end_step": state.global_step, "genes": genes})
                with open(os.path.join(path, "lineage.json"), "w") as f:
                    json.dump(segments, f)
                value = float(self.metrics.get(metric, math.nan))
                # The learning rate the optimizer really uses now: shows that a clone trains at its own genes.
                lr_now = trainer.optimizer.param_groups[0]["lr"]
                if not math.isfinite(value):
                    value = math.inf if mode == "min" else -math.inf
                # `trained`: optimizer steps since this run of the trial last reported (or started). The times show
                # where wall time goes: Ray restarts a trial's worker process at most perturbations (see `startup_s`).
                record = {"trial": trial_id, "step": state.global_step, metric: value, "genes": genes,
                          "trained": state.global_step - self.last_step, "began": began, "ready": ready,
                          "time": time.time(), "lr": lr_now}  # fmt: skip
                self.last_step = state.global_step
                # One short line per write with O_APPEND: trials append to the same file without interleaving.
                with open(os.path.join(job_dir, "reports.jsonl"), "a") as f:
                    f.write(json.dumps(record) + "\n")
                # Ray copies the checkpoint into its storage before report returns, so the local copy can go.
                tune.report(
                    {"step": state.global_step, metric: value}, checkpoint=tune.Checkpoint.from_directory(path)
                )
                shutil.rmtree(path, ignore_errors=True)

        trainer.add_callback(Report())
        trainer.train(resume_from_checkpoint=resume_dir)


def _load_final_model(problem, settings, config: dict, checkpoint_dir: str):
    """The best trial's final weights in a fresh model of the problem."""
    from safetensors.torch import load_file
    from schedule_suite import _training_fields

    _, model_kwargs = _training_fields(problem, {}, settings)
    if "dropout" in config:
        model_kwargs["dropout"] = config["dropout"]
    model = problem.make_model(settings, **model_kwargs)
    state = load_file(os.path.join(checkpoint_dir, "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # save_pretrained leaves out tied weights (GPT-2's lm_head is wte): those may be missing, nothing else.
    loaded = {p.data_ptr() for name, p in model.state_dict().items() if name in state}
    untied = [name for name in missing if model.state_dict()[name].data_ptr() not in loaded]
    if untied or unexpected:
        raise RuntimeError(f"checkpoint {checkpoint_dir} does not match the model: {untied=} {unexpected=}")
    return model


def run_ray_pbt(problem_name: str, settings, job_dir: str) -> None:
    """Ray Tune PBT on one problem at the clan's budget; writes `job_dir/result.json` (see the module docstring)."""
    import numpy as np
    import ray
    from bench_utils import cpu_cores, lr_shape, write_json
    from ray import tune
    from schedule_suite import ALL_PROBLEMS, _training_fields

    problem = ALL_PROBLEMS[problem_name]
    job_dir = os.path.abspath(job_dir)
    # Trials run with another working directory: every path they get must be absolute.
    settings = dataclasses.replace(settings, cache_dir=os.path.abspath(settings.cache_dir))
    metric, mode = _metric(problem)
    start, bounds, space = gene_space(problem, settings)
    # A rerun into the same directory must not read the last run's reports or resume its experiment.
    shutil.rmtree(os.path.join(job_dir, "ray"), ignore_errors=True)
    if os.path.exists(os.path.join(job_dir, "reports.jsonl")):
        os.remove(os.path.join(job_dir, "reports.jsonl"))
    os.makedirs(os.path.join(job_dir, SCRATCH), exist_ok=True)
    population = settings.num_processes
    # PBT draws exploit and explore choices from `random`, and resamples genes from numpy's global generator. Runs
    # still differ from one to the next (other code in Ray's driver draws from `random` too, at times that vary).
    random.seed(settings.seed)
    np.random.seed(settings.seed)

    def clip(config: dict) -> dict:
        for name, (low, high) in bounds.items():
            config[name] = min(max(config[name], low), high)
        return config

    # Ray's workers are started by its raylet, which inherits this environment: they must find the benchmark
    # modules (`ray_pbt`, `schedule_suite`, `bench_utils`) to unpickle the trial, and run one thread each.
    keys = ("PYTHONPATH", "OMP_NUM_THREADS", "RAY_USAGE_STATS_ENABLED", "TUNE_FUNCTION_THREAD_TIMEOUT_S")
    saved_env = {key: os.environ.get(key) for key in keys}
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, os.environ.get("PYTHONPATH")) if p)
    os.environ["OMP_NUM_THREADS"] = "1"
    # A reused actor first ends the trial it ran, and Ray fails the trial if that takes over 2 s (its default): a
    # loaded machine can take longer.
    os.environ["TUNE_FUNCTION_THREAD_TIMEOUT_S"] = "60"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report from an offline benchmark
    cores = cpu_cores()
    try:
        ray.init(
            address="local", num_cpus=cores, object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False,
            log_to_driver=False, logging_level=logging.WARNING,
        )  # fmt: skip
        # All P trials must run at once, as the clan's members do: split the cores evenly (Ray counts in 1e-4).
        per_trial = math.floor(cores / population * 1e4) / 1e4
        trainable = tune.with_resources(
            tune.with_parameters(_trial, problem_name=problem_name, settings_dict=dataclasses.asdict(settings),
                                 job_dir=job_dir),
            {"cpu": per_trial},
        )  # fmt: skip
        scheduler, search = _pbt(
            start, settings.seed, time_attr="step", perturbation_interval=settings.round_steps,
            hyperparam_mutations=space, quantile_fraction=0.25, custom_explore_fn=clip,
        )  # fmt: skip
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=metric, mode=mode, scheduler=scheduler, num_samples=population,
                search_alg=search, reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name="pbt", storage_path=os.path.join(job_dir, "ray"), verbose=0,
                # Stopping at the last step also keeps PBT from cloning into a trial that has finished.
                stop={"step": settings.steps},
                checkpoint_config=tune.CheckpointConfig(num_to_keep=NUM_TO_KEEP),
                # fail_fast: trials waiting for a failed one at a perturbation point would otherwise wait forever.
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=True),
            ),
        )  # fmt: skip
        began = time.perf_counter()
        grid = tuner.fit()
        train_s = time.perf_counter() - began
        if grid.errors:
            raise RuntimeError(f"{len(grid.errors)} Ray trial(s) failed; first: {grid.errors[0]}")

        sign = 1.0 if mode == "min" else -1.0
        finished = [r for r in grid if r.checkpoint is not None and metric in r.metrics]
        best = min(finished, key=lambda r: sign * r.metrics[metric])
        with best.checkpoint.as_directory() as checkpoint_dir:
            model = _load_final_model(problem, settings, best.config, checkpoint_dir)
            with open(os.path.join(checkpoint_dir, "lineage.json")) as f:
                lineage = json.load(f)
    finally:
        ray.shutdown()
        shutil.rmtree(os.path.join(job_dir, SCRATCH), ignore_errors=True)
        shutil.rmtree(os.path.join(job_dir, "ray"), ignore_errors=True)  # every trial's checkpoints (NUM_TO_KEEP)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    reports = []
    with open(os.path.join(job_dir, "reports.jsonl")) as f:
        reports = [json.loads(line) for line in f]
    by_step: dict[int, list[float]] = {}
    for report in reports:
        by_step.setdefault(report["step"], []).append(report[metric])
    pick = min if mode == "min" else max
    starts = {(r["began"], r["ready"]) for r in reports}

    _, val, test = problem.make_data(settings)
    score = _scorer(problem)
    fields, _ = _training_fields(problem, {}, settings)
    shape = lr_shape(fields["lr_scheduler_type"], fields["warmup_steps"], settings.steps)
    lr = []
    for segment in lineage:
        value = segment["genes"].get("learning_rate", fields["learning_rate"])
        lr.extend(value * shape[s] for s in range(segment["start_step"], segment["end_step"]))

    disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(job_dir) for f in fs)
    write_json(
        os.path.join(job_dir, "result.json"),
        {
            "fitness": score(model, test),
            "val_fitness": score(model, val),
            "train_s": train_s,
            "samples": sum(r["trained"] for r in reports) * settings.per_device_batch,
            "eval_samples": len(reports) * len(val),
            "curve": [[step, pick(values)] for step, values in sorted(by_step.items())],
            "lr_schedule": lr,
            "hyperparameters": dict(best.config),
            "lineage": lineage,
            "final_genes": dict(best.config),
            "start_genes": start,
            "trials": population,
            # Ray's own cost: how often a trial (re)started, and the seconds those starts spent importing and
            # building before training, summed over trials.
            "trial_starts": len(starts),
            "startup_s": sum(ready - began for began, ready in starts),
            "disk_bytes": disk,
        },
    )
