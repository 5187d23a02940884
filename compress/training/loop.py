"""The shared training loop: distillation, unlearning, SR-STE and EQ-Net all train through it.

A training method (:mod:`compress.training.method`) supplies ``loss``; :func:`train` does the
rest on accelerate, so one recipe trains the same run on the CPU, one GPU or several
(``accelerate launch -m compress apply recipe.yaml`` for DDP; with ``--use_fsdp``, the model
sharded per block, :mod:`compress.training.sharding`): ``batch_size`` is the global batch of
each dataset per optimizer step, split over the devices and, past ``micro_batch_size``,
accumulated; bf16 autocast over fp32 master weights, gradient checkpointing, the
straight-through path through layers an earlier stage quantized or pruned
(:mod:`compress.straight_through`), a learning-rate schedule (``transformers.get_scheduler``),
gradient clipping, evaluation every N steps, experiment trackers (``report_to``,
:mod:`compress.training.trackers`), library warnings written once above the progress bar,
checkpoints every N steps and on Ctrl-C, resuming (``compress apply --resume``) only with the
recipe that wrote the checkpoint, and a stop on a NaN or inf loss that names the step.

Only the parameters of the method's groups (by default the targeted modules' own) are
trained; the rest of the model is frozen.
"""

from __future__ import annotations

import math
import shutil
import signal
import sys
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from compress.context import Context, StageRun
from compress.data import Sample, collate
from compress.devices import move, onloaded
from compress.errors import UserError
from compress.library_warnings import warnings_above_the_bar
from compress.straight_through import straight_through
from compress.training.checkpoint import (
    CHECKPOINT_STATE,
    TrainerState,
    checkpoint_directory,
    fingerprint,
    recipe_changes,
    resumable_keys,
)
from compress.training.method import Batch, TrainingMethod, TrainParams
from compress.training.sharding import (
    SHARDED_STATE,
    clip_sharded,
    is_sharded,
    load_sharded,
    save_sharded,
    shard_model,
    sharding_active,
)
from compress.training.trackers import StageTrackers, accelerator_options


class TrainingDiverged(UserError):
    """The loss became NaN or inf."""


def batch_split(params: TrainParams, devices: int, stage: str) -> tuple[int, int]:
    """``(micro_batch_size, micro-steps per optimizer step)`` of each device when ``devices``
    share the global ``batch_size``; a UserError naming ``stage`` when they cannot."""
    share, rest = divmod(params.batch_size, devices)
    if rest:
        raise UserError(f"batch_size {params.batch_size} does not split evenly over {devices} devices", stage)
    micro = params.micro_batch_size or share
    if share % micro:
        raise UserError(
            f"each of {devices} devices takes {share} samples of batch_size {params.batch_size}, "
            f"not a multiple of micro_batch_size {micro}",
            stage,
        )
    return micro, share // micro


@dataclass
class DatasetStream:
    """One dataset's micro-batches for one process: its own sampler.

    Each epoch is a permutation of the samples that depends only on the seed, the dataset
    and the epoch. Optimizer step ``t`` of an epoch reads samples ``[t*B, (t+1)*B)`` of that
    permutation (``B`` = ``batch_size``), cut into micro-batches dealt to the processes in
    turn. So a run reads the same global batches on any number of devices at any
    micro-batch size, and a resumed run continues at this dataset's own epoch and position.
    """

    name: str
    samples: list[Sample]
    seed: int
    batch_size: int
    micro_batch_size: int
    process: int
    processes: int
    pad_id: int
    _last: tuple[int, list[int]] = field(default=(-1, []), repr=False)
    _tokens: list[int] = field(default_factory=list, repr=False)  # of each sample, counted once

    def global_batch(self, step: int) -> list[int]:
        """The sample indices of optimizer step ``step`` (0-based), over all processes."""
        epoch, position = divmod(step, len(self.samples) // self.batch_size)
        if self._last[0] != epoch:
            key = zlib.crc32(f"{self.seed}/{self.name}/{epoch}".encode())
            generator = torch.Generator().manual_seed(key)
            self._last = (epoch, torch.randperm(len(self.samples), generator=generator).tolist())
        return self._last[1][position * self.batch_size : (position + 1) * self.batch_size]

    def batches(self, step: int) -> list[Batch]:
        """This process's micro-batches of optimizer step ``step``, on the host."""
        chosen, micro = self.global_batch(step), self.micro_batch_size
        firsts = range(self.process * micro, len(chosen), self.processes * micro)
        return [collate([self.samples[i] for i in chosen[first : first + micro]], self.pad_id) for first in firsts]

    def tokens(self, step: int) -> int:
        """Real tokens in the global batch of ``step`` (0 for data without ``input_ids``)."""
        if not self._tokens:
            self._tokens = [sample_tokens(sample) for sample in self.samples]
        return sum(self._tokens[i] for i in self.global_batch(step))


def sample_tokens(sample: Sample) -> int:
    """The real tokens of one sample: its ``attention_mask``'s ones, else its ``input_ids``, else 0."""
    if "attention_mask" in sample:
        return int(sample["attention_mask"].sum())
    return sample["input_ids"].numel() if "input_ids" in sample else 0


def upcast(parameters: list[nn.Parameter]) -> None:
    """Hold the bf16 and fp16 ones of ``parameters`` in fp32 (the trained master weights)."""
    for parameter in parameters:
        if parameter.dtype in (torch.bfloat16, torch.float16):
            parameter.data = parameter.data.float()


@contextmanager
def fp32_master_weights(parameters: list[nn.Parameter]) -> Iterator[None]:
    """Train low-precision parameters in fp32 and cast them back afterwards."""
    dtypes = [parameter.dtype for parameter in parameters]
    upcast(parameters)
    try:
        yield
    finally:
        for parameter, dtype in zip(parameters, dtypes):
            parameter.data = parameter.data.to(dtype)


@contextmanager
def trainable_only(model: nn.Module, trainable: list[nn.Parameter]) -> Iterator[None]:
    """Freeze every parameter of ``model`` except ``trainable`` for the duration."""
    flags = {parameter: parameter.requires_grad for parameter in model.parameters()}
    chosen = {id(parameter) for parameter in trainable}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in chosen)
    try:
        yield
    finally:
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)


@contextmanager
def interrupt_deferred(notice: str) -> Iterator[list[bool]]:
    """Turn the first Ctrl-C into a flag the loop checks between steps (so a checkpoint is
    consistent), acknowledged at once with ``notice``; a second Ctrl-C stops at once."""
    flag = [False]

    def remember(_signum: int, _frame: Any) -> None:
        if flag[0]:
            raise KeyboardInterrupt
        flag[0] = True
        tqdm.write(notice, file=sys.stderr)

    try:
        previous = signal.signal(signal.SIGINT, remember)
    except ValueError:  # not the main thread: Ctrl-C cannot reach us anyway
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def train(context: Context, run: StageRun, method: TrainingMethod) -> None:
    """Run ``method``'s training stage on ``context.model`` and record it in ``run.record``."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    params = method.params
    model = context.model
    precision = params.mixed_precision
    if precision == "auto":
        low = next(model.parameters()).dtype in (torch.bfloat16, torch.float16)
        precision = "bf16" if context.device.type == "cuda" or low else "no"
    # autocast and accumulation are ours (_Loop): accelerate's are process-wide and tied to one dataloader
    accelerator = Accelerator(
        cpu=context.device.type == "cpu", device_placement=False, **accelerator_options(context, run)
    )
    stage = f"stage {run.stage.label!r}"
    micro, accumulation = batch_split(params, accelerator.num_processes, stage)
    set_seed(context.recipe.run.seed + run.index)
    pad_id = getattr(context.tokenizer, "pad_token_id", None) or 0
    streams = {
        dataset: DatasetStream(
            name=dataset,
            samples=context.data(entry),
            seed=context.recipe.run.seed,
            batch_size=params.batch_size,
            micro_batch_size=micro,
            process=accelerator.process_index,
            processes=accelerator.num_processes,
            pad_id=pad_id,
        )
        for dataset, entry in method.data_names().items()
    }
    evaluation = {}
    for dataset, entry in method.eval_names().items():
        samples = context.data(entry)
        evaluation[dataset] = [collate(samples[i : i + micro], pad_id) for i in range(0, len(samples), micro)]
    trainable = [p for module in run.targets.values() for p in module.parameters(recurse=False)]
    for name, module in run.targets.items():
        run.record.layers[name] = {"trained_parameters": sum(p.numel() for p in module.parameters(recurse=False))}
    constrain = (
        straight_through(run.targets, context.layers, latent_weights(context, run))
        if method.straight_through
        else nullcontext(0)
    )
    sharded = sharding_active()
    if sharded:  # fp32 for good: the sharded model is written from its shards, in the loaded dtype
        upcast(trainable)
    with (
        warnings_above_the_bar(),
        nullcontext() if sharded else onloaded(model, context.device),
        nullcontext() if sharded else fp32_master_weights(trainable),
        constrain as constrained,
    ):
        if params.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if sharded:
            if not is_sharded(model):  # else sharded already, e.g. materialized shard by shard from the meta device
                shard_model(model, context.device, compute_dtype=torch.bfloat16 if precision == "bf16" else None)
            # the targets' parameters are new objects now, DTensor shards; dropping the old ones frees
            # the whole weights fully_shard moved onto the device
            trainable = [p for module in run.targets.values() for p in module.parameters(recurse=False)]
        try:
            method.prepare(context, run, context.device)
            run.record.details["constrained_layers"] = constrained
            groups = [dict(group, params=list(group["params"])) for group in method.parameter_groups(trainable)]
            with trainable_only(model, [p for group in groups for p in group["params"]]):
                bf16 = precision == "bf16"
                _Loop(context, run, method, accelerator, groups, streams, evaluation, accumulation, bf16).run()
        finally:
            method.finish(context, run)
            accelerator.free_memory()
            if params.gradient_checkpointing and hasattr(model, "gradient_checkpointing_disable"):
                model.gradient_checkpointing_disable()
            model.eval()


def latent_weights(context: Context, run: StageRun) -> dict[str, torch.Tensor] | None:
    """The original model's weights of the targeted layers, when the stage starts from them."""
    if run.method.params.latent_weights != "original":
        return None
    reference = dict(context.reference_model().named_modules())
    return {name: reference[name].weight.data for name in run.targets}


class _Carried:
    """What a checkpoint holds besides accelerate's model, optimizer, scheduler and RNG state:
    the values of the optimizer's parameters that are not the model's, and ``context.state``;
    with ``optimizer`` (FSDP, whose sharded optimizer state leaves them out), their optimizer
    state too."""

    def __init__(self, extra: list[nn.Parameter], context: Context, optimizer: torch.optim.Optimizer | None) -> None:
        self.extra, self.context, self.optimizer = extra, context, optimizer

    def state_dict(self) -> dict[str, Any]:
        saved = {"extra": [parameter.detach().cpu() for parameter in self.extra], "state": self.context.state}
        if self.optimizer is not None:
            saved["optimizer"] = [move(self.optimizer.state.get(p, {}), torch.device("cpu")) for p in self.extra]
        return saved

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        shapes = [tuple(value.shape) for value in saved["extra"]]
        if shapes != [tuple(parameter.shape) for parameter in self.extra]:
            ours = [tuple(parameter.shape) for parameter in self.extra]
            raise ValueError(f"extra parameters of shapes {shapes}, the method's are {ours}")
        with torch.no_grad():
            for parameter, value in zip(self.extra, saved["extra"]):
                parameter.copy_(value)
        self.context.state.clear()
        self.context.state.update(saved["state"])
        if self.optimizer is not None:
            for parameter, state in zip(self.extra, saved["optimizer"]):
                if state:
                    self.optimizer.state[parameter] = move(state, parameter.device)


class _Loop:
    """One training stage's optimizer, schedule, steps, checkpoints and logging."""

    def __init__(
        self,
        context: Context,
        run: StageRun,
        method: TrainingMethod,
        accelerator: Any,
        groups: list[dict[str, Any]],
        streams: dict[str, DatasetStream],
        evaluation: dict[str, list[Batch]],
        accumulation: int,
        bf16: bool,
    ) -> None:
        self.context, self.run_, self.method, self.accelerator = context, run, method, accelerator
        self.streams, self.evaluation, self.accumulation = streams, evaluation, accumulation
        self.where = f"stage {run.stage.label!r}"
        self.autocast = torch.autocast(context.device.type, dtype=torch.bfloat16, enabled=bf16)
        self.params = method.params
        optimizer = method.configure_optimizer(groups)
        self.parameters = [p for group in optimizer.param_groups for p in group["params"]]
        in_model = {id(p) for p in context.model.parameters()}
        self.extra = [p for p in self.parameters if id(p) not in in_model]
        # the scheduler stays unprepared: accelerate would step it once per process
        self.scheduler = self.params.scheduler(optimizer)
        self.sharded = sharding_active()
        if self.sharded:  # FSDP2 reduce-scatters the gradients itself; accelerate sees no model
            self.model, self.optimizer = context.model, optimizer
        else:
            self.model, self.optimizer = accelerator.prepare(context.model, optimizer)
        # what the method's loss runs; checkpoints, no_sync and train/eval use the uncompiled self.model
        self.forward = torch.compile(self.model) if self.params.compile else self.model
        self.directory = checkpoint_directory(context, run)
        accelerator.register_for_checkpointing(self.scheduler)
        accelerator.register_for_checkpointing(_Carried(self.extra, context, optimizer if self.sharded else None))
        self.state = TrainerState(
            fingerprint=fingerprint(context, run), processes=accelerator.num_processes, sharded=self.sharded
        )
        self.trackers = StageTrackers(accelerator, context, run)

    def run(self) -> None:
        self._resume_or_refuse()
        self.trackers.start()
        try:
            self._train()
        finally:
            self.trackers.finish()

    def _train(self) -> None:
        if self.state.step:
            self._progress(self.state.step, {"resumed_from_step": self.state.step})
        params, record = self.params, self.run_.record
        started, start_step, start_tokens = self._clock(), self.state.step, self.state.tokens
        self.logged = (started, start_tokens)
        self.unchecked: list[tuple[int, torch.Tensor]] = []  # (step, loss) not yet read back
        warm = None  # clock and tokens after the first step: the rate without one-time costs
        self.model.train()
        if self.directory is None:
            notice = "stopping after this step (no checkpoint: the recipe has no output); Ctrl-C again stops now"
        else:
            notice = f"stopping after this step; checkpoint at {self.directory}; Ctrl-C again stops without it"
        with interrupt_deferred(notice) as interrupted:
            while self.state.step < params.steps:
                loss, logs = self._step()
                self.state.step += 1
                if warm is None:
                    warm = (self._clock(), self.state.tokens)
                self._after_step(loss, logs)
                if interrupted[0]:
                    self._check_finite()
                    self._save_checkpoint()
                    if self.directory is None:
                        raise KeyboardInterrupt
                    raise KeyboardInterrupt(
                        f"training checkpoint at {self.directory} (step {self.state.step}/{params.steps}); "
                        "continue with compress apply RECIPE --resume"
                    )
        ended = self._clock()
        seconds = ended - started
        steady = None
        if warm is not None and self.state.step > start_step + 1:
            steady = (self.state.tokens - warm[1]) / max(ended - warm[0], 1e-9)
        record.details.update(
            steps=self.state.step,
            tokens=self.state.tokens,
            tokens_per_second=(self.state.tokens - start_tokens) / max(seconds, 1e-9),
            first_step_seconds=None if warm is None else warm[0] - started,
            steady_tokens_per_second=steady,
            resumed_from_step=start_step or None,
            devices=self.accelerator.num_processes,
            fsdp=self.sharded,
            micro_steps=self.accumulation,
            loss_curve=self.state.loss_curve,
            eval_curve=self.state.eval_curve,
        )

    def _clock(self) -> float:
        """The wall clock once every process has finished its queued device work: rates are the
        global batch's tokens (the same count in every process) per second of the slowest one."""
        if self.context.device.type == "cuda":
            torch.cuda.synchronize(self.context.device)
        self.accelerator.wait_for_everyone()
        return time.perf_counter()

    def _step(self) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        """One optimizer step over this process's micro-batches of every dataset; returns the
        mean loss and logged values of its micro-steps, left on the device: a step reads
        nothing back from it (see :meth:`_check_finite`)."""
        step = self.state.step
        micro_batches = {name: stream.batches(step) for name, stream in self.streams.items()}
        total, logs = torch.zeros((), device=self.context.device), {}
        for index in range(self.accumulation):
            batches = {name: self._on_device(micro[index]) for name, micro in micro_batches.items()}
            last = index == self.accumulation - 1
            # FSDP reduce-scatters every micro-step: holding whole unsharded gradients would cost what sharding saves
            with nullcontext() if last or self.sharded else self.accelerator.no_sync(self.model):
                with self.autocast:
                    loss, values = self.method.loss(self.forward, batches)
                self.accelerator.backward(loss / self.accumulation)
            total += loss.detach().float() / self.accumulation
            for key, value in values.items():  # floats or tensors: read on the host only when shown
                logs[key] = logs.get(key, 0.0) + value / self.accumulation
        if self.accelerator.num_processes > 1:
            # DDP averages the model's gradients; parameters outside it are averaged here
            for parameter in self.extra:
                if parameter.grad is not None:
                    parameter.grad = self.accelerator.reduce(parameter.grad, reduction="mean")
        if self.sharded:
            clip_sharded(self.parameters, self.params.max_grad_norm, self.params.max_grad_value)
        else:
            if self.params.max_grad_value is not None:
                self.accelerator.clip_grad_value_(self.parameters, self.params.max_grad_value)
            if self.params.max_grad_norm is not None:
                self.accelerator.clip_grad_norm_(self.parameters, self.params.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.tokens += sum(stream.tokens(step) for stream in self.streams.values())
        return total, logs

    def _on_device(self, batch: Batch) -> Batch:
        return {key: value.to(self.context.device) for key, value in batch.items()}

    def _check_finite(self) -> list[float] | None:
        """Stop on the first NaN or inf loss since the last check, naming its step; else return
        every process's loss at the newest step checked (None when nothing was waiting).

        Each step's loss stays on the device and is checked here, at log points, evaluations,
        checkpoints and the end, in one read: a read after every step would make the host
        wait for the device's queue each step. The steps after a bad one (up to ``log_every``)
        still run; nothing of theirs is written. Every process reads every process's losses,
        so all of them stop together."""
        if not self.unchecked:
            return None
        steps, losses = zip(*self.unchecked)
        self.unchecked = []
        rows = self.accelerator.gather(torch.stack(losses)).reshape(-1, len(steps)).tolist()
        for step, values in zip(steps, zip(*rows)):
            value = next((value for value in values if not math.isfinite(value)), None)
            if value is not None:
                raise TrainingDiverged(
                    f"loss is {value} at step {step}; nothing was written (try a lower lr or max_grad_norm)",
                    self.where,
                )
        return [row[-1] for row in rows]

    def _after_step(self, loss: torch.Tensor, logs: dict[str, float | torch.Tensor]) -> None:
        step, params = self.state.step, self.params
        self.unchecked.append((step, loss))
        logging = step % params.log_every == 0 or step == params.steps
        evaluating = bool(params.eval_every and self.evaluation) and (
            step % params.eval_every == 0 or step == params.steps
        )
        saving = bool(params.checkpoint_every) and step % params.checkpoint_every == 0 and step < params.steps
        newest = self._check_finite() if logging or evaluating or saving else None
        if logging:
            value = sum(newest) / len(newest)  # this step's loss, averaged over the processes
            self.state.loss_curve.append((step, value))
            shown = {"loss": round(value, 4), "lr": float(f"{self.scheduler.get_last_lr()[0]:.3g}")}
            shown.update({key: round(float(item), 4) for key, item in logs.items()})
            shown.update(self.method.log_values(self.context, self.run_, step))
            self._progress(step, shown)
            now, tokens = time.perf_counter(), self.state.tokens
            rate = (tokens - self.logged[1]) / max(now - self.logged[0], 1e-9)
            self.logged = (now, tokens)
            lr = self.scheduler.get_last_lr()[0]
            self.trackers.log(step, {**shown, "loss": value, "lr": lr, "tokens_per_second": rate})
        if evaluating:
            value = self._evaluate()
            self.state.eval_curve.append((step, value))
            self.trackers.log(step, {"eval_loss": value})
            self._progress(step, {"eval_loss": value})
        if saving:
            self._save_checkpoint()

    def _progress(self, step: int, logs: dict[str, Any]) -> None:
        self.context.host.hook.compress_stage_progress(
            context=self.context, stage=self.run_.stage, step=step, total=self.params.steps, logs=logs
        )

    @torch.no_grad()
    def _evaluate(self) -> float:
        """The mean loss over the eval data (each process evaluates all of it, so they agree);
        with several datasets, over as many micro-steps as the smallest gives."""
        self.model.eval()
        total, count = 0.0, 0
        for chunks in zip(*self.evaluation.values()):
            batches = {name: self._on_device(batch) for name, batch in zip(self.evaluation, chunks)}
            with self.autocast:
                loss, _ = self.method.loss(self.forward, batches)
            total, count = total + loss.float().item(), count + 1
        self.model.train()
        return total / max(count, 1)

    def _save_checkpoint(self) -> None:
        """Write the checkpoint next to the output, replacing the previous one only once complete."""
        if self.directory is None:
            return
        staging = self.directory.with_name(self.directory.name + ".partial")
        if self.accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(staging))
        if self.sharded:
            save_sharded(staging / SHARDED_STATE, self.model, self.optimizer)
        if self.accelerator.is_main_process:
            self.state.save(staging / CHECKPOINT_STATE)
            shutil.rmtree(self.directory, ignore_errors=True)
            staging.rename(self.directory)
        self.accelerator.wait_for_everyone()
        self.run_.record.details["checkpoint"] = str(self.directory)

    def _resume_or_refuse(self) -> None:
        if self.directory is None or not (self.directory / CHECKPOINT_STATE).is_file():
            return
        saved = TrainerState.load(self.directory / CHECKPOINT_STATE)
        if not self.context.resume:
            raise UserError(
                f"a checkpoint of this training stage exists (step {saved.step}/{self.params.steps}); "
                "pass --resume to continue from it, or delete it to start over",
                str(self.directory),
            )
        changes = recipe_changes(saved.fingerprint, self.state.fingerprint, resumable_keys(self.run_.index))
        if changes:
            raise UserError(
                "cannot resume: the recipe changed since the checkpoint was written (" + "; ".join(changes) + ")",
                str(self.directory),
            )
        if saved.step > self.params.steps:
            raise UserError(
                f"cannot resume: the checkpoint is at step {saved.step}, past this stage's steps: {self.params.steps}",
                str(self.directory),
            )
        if saved.sharded != self.sharded or (self.sharded and saved.processes != self.state.processes):
            raise UserError(
                f"cannot resume: the checkpoint was written {_layout(saved.sharded, saved.processes)}, "
                f"this run is {_layout(self.sharded, self.state.processes)}; relaunch as it was",
                str(self.directory),
            )
        saved.fingerprint = self.state.fingerprint  # later checkpoints record the recipe as resumed
        saved.processes = self.state.processes
        try:
            self.accelerator.load_state(str(self.directory))
            if self.sharded:
                load_sharded(self.directory / SHARDED_STATE, self.model, self.optimizer)
        except (ValueError, RuntimeError) as error:  # e.g. a plugin version with other parameters wrote it
            raise UserError(
                f"the checkpoint does not fit this stage's parameters ({error}); delete it to start over",
                str(self.directory),
            ) from None
        self.state = saved


def _layout(sharded: bool, processes: int) -> str:
    """How a training run holds its model, in words: e.g. "sharded over 2 processes (FSDP)"."""
    return f"sharded over {processes} processes (FSDP)" if sharded else "whole on every process (not FSDP)"
