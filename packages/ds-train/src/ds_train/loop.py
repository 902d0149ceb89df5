"""``train(config)``: one readable loop from a dataset and a pipeline to LoRA or full weights.

The order is the order of a run: read the dataset (broken rows fail before any model loads), load the pipeline,
make the trainable part (peft LoRA or full), optionally cache encodings, build the optimizer, resume, then
step: encode (or read the cache), noise at sampled sigmas, predict the velocity, MSE, backward, optimizer.
accelerate does mixed precision and distribution; gradient accumulation is explicit (``no_sync`` on all but
the last micro-batch), so one optimizer step is one ``step`` everywhere (logs, checkpoints, LR schedule).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ds_pipelines import write_bytes_atomic
from ds_pipelines.base import unwrap_model

from .cache import (
    build_cache,
    encode_sample,
    encode_sample_empty_prompt,
    load_cached,
    load_cached_sample,
    stack_conditions,
)
from .checkpoint import (
    finish_checkpoint,
    latest_checkpoint,
    load_rng,
    read_checkpoint,
    read_rng,
    remove_staging_leftovers,
    rng_state,
    save_file_atomic,
    staging_folder,
    write_rng,
)
from .config import TrainingConfig, TrainingResult
from .data import ImageDataset, collate
from .family import TrainingAdapter, adapter_for
from .logs import RunLog, draw_loss_curve
from .lora import add_lora, load_lora_state, lora_state, resolve_targets
from .memory import estimate_training_memory
from .parts import BatchPlan, enable_gradient_checkpointing, make_lr_scheduler, make_optimizer, parse_dtype

__all__ = ["train"]


def train(config: TrainingConfig, *, adapter: TrainingAdapter | None = None) -> TrainingResult:
    """Run ``config``; returns where the weights are. Works as a plain call and under ``accelerate launch``.

    Ctrl-C (KeyboardInterrupt) saves a checkpoint at the last finished step and returns with ``interrupted``
    set; while it saves, a second Ctrl-C only says that the save goes on (a fourth abandons it, saying so).
    ``config.resume=True`` continues from the newest checkpoint in ``<output>/checkpoints`` to the same
    loss curve an uninterrupted run follows. One run at a time per output folder: a second one raises
    ``FolderLockedError`` naming the first (pid, host, start); the lock of a run that died is taken over, and the
    temporary files and checkpoint staging folders it left are removed, with a message.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # LoRA layers a batch never reaches (or blocks skipped by a family) would make DDP fail at the second step;
    # finding unused parameters costs one graph walk per step and spares every user that flag.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # accelerate keeps one process-wide state and refuses a second run with another precision; a single
        # process (a notebook, a script training twice) starts each run fresh. Launched runs keep theirs.
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision, kwargs_handlers=[ddp], cpu=config.device == "cpu"
    )
    run = _Run(config, accelerator, adapter or adapter_for(config))
    with run.claim_output():
        return run.execute()


class _Run:
    """The state of one run; methods are the loop's parts, in the order they happen."""

    def __init__(self, config: TrainingConfig, accelerator: Any, adapter: TrainingAdapter):
        self.config, self.accelerator, self.adapter = config, accelerator, adapter
        self.output = config.output_path
        self.device = accelerator.device
        self.main = accelerator.is_main_process
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.weight_dtype = parse_dtype(config.weight_dtype, config.mixed_precision)
        self.height = config.height or adapter.default_size[0]
        self.width = config.width or adapter.default_size[1]
        self.num_frames = config.num_frames or adapter.default_num_frames
        self.sampling = config.timestep_sampling or adapter.default_timestep_sampling
        self.weighting = config.loss_weighting or adapter.default_loss_weighting
        self.losses: list[float] = []
        self.samples: list[Path] = []

    def say(self, message: str) -> None:
        if self.main:
            print(f"[ds-train] {message}", flush=True)

    # ------------------------------------------------------------------ setup
    @contextlib.contextmanager
    def claim_output(self) -> Iterator[None]:
        """The main process locks the output folder for the run, then removes what killed runs left in it."""
        if not self.main:
            yield
            return
        from ds_pipelines import FolderLock

        lock = FolderLock(self.output, ".ds-train.lock").acquire()
        try:
            if lock.notice:
                self.say(lock.notice)
            self._remove_leftovers()
            yield
        finally:
            lock.release()

    def _remove_leftovers(self) -> None:
        """Holding the lock, every temporary here is a dead run's: staging folders and hidden partial files."""
        from ds_pipelines import remove_leftovers

        checkpoints = self.output / "checkpoints"
        removed = remove_staging_leftovers(checkpoints)
        folders = [self.output, checkpoints, self.output / "cache", self.output / "samples"]
        folders += [path for path in checkpoints.glob("step-*") if path.is_dir()] if checkpoints.is_dir() else []
        for folder in folders:
            removed += remove_leftovers(folder, started=time.time())
        if removed:
            names = ", ".join(str(path.relative_to(self.output)) for path in removed[:10])
            more = f" and {len(removed) - 10} more" if len(removed) > 10 else ""
            self.say(f"removed {len(removed)} leftover(s) of an interrupted run in {self.output}: {names}{more}")

    def execute(self) -> TrainingResult:
        config = self.config
        _seed_everything(config.seed)
        if self.main:
            self.output.mkdir(parents=True, exist_ok=True)
            text = json.dumps(config.to_json(), indent=1, default=str, allow_nan=False)
            write_bytes_atomic(self.output / "config.json", text.encode())
        self.dataset = ImageDataset(
            config.data,
            self.height,
            self.width,
            buckets=config.buckets,
            skip_broken=config.skip_broken,
            trigger=config.trigger_words[0] if config.trigger_words else None,
            repeats=config.repeats,
            num_frames=self.num_frames,
            frame_stride=config.frame_stride,
            temporal_compression=self.adapter.temporal_compression,
        )
        self.say(self.dataset.describe())
        self.pipe = self.adapter.load_pipeline(config.model, self.device, self.weight_dtype, self._vram_configs())
        self.adapter.check(self.pipe, self.height, self.width, self.num_frames)
        self.adapter.check_extras(self.pipe, self.dataset.extra_roles)
        self.model_name = str(config.model) if not isinstance(config.model, dict) else "custom"
        if config.cache:
            self._build_cache()
        self.model = self._make_trainable()
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(self.adapter.blocks(self.model), config.offload_activations)
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable_names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.parameters, config.optimizer, config.learning_rate, config.weight_decay)
        self.lr_scheduler = make_lr_scheduler(
            self.optimizer, config.lr_scheduler, config.lr_warmup_steps, config.steps
        )
        self._print_memory_estimate()
        start, resume_from = self._resume_weights()
        # DDP must not broadcast or reduce frozen weights (they are identical everywhere and may be placeholders).
        self.model._ddp_params_and_buffers_to_ignore = [
            n for n, p in self.model.named_parameters() if not p.requires_grad
        ]
        # The pipeline already placed every model (ds-vram keeps frozen weights where its config says).
        self.prepared, self.optimizer = self.accelerator.prepare(
            self.model, self.optimizer, device_placement=[False, False]
        )
        if resume_from is not None:
            rng = read_rng(resume_from, self.rank)
            if rng is not None:
                load_rng(*rng, {"noise": self.generator})
        return self._loop(start)

    def _vram_configs(self) -> dict[str, Any] | None:
        config = self.config
        if not (config.fp8_frozen or config.stream_frozen):
            return None
        from ds_pipelines import VRAMConfig

        frozen = VRAMConfig(
            storage="cpu" if config.stream_frozen else "device",
            storage_dtype="fp8" if config.fp8_frozen else None,
            computation_device=self.device,
            computation_dtype=self.weight_dtype,
            vram_limit=config.vram_limit if config.stream_frozen else None,
        )
        encoders = VRAMConfig(storage="cpu", computation_device=self.device, computation_dtype=self.weight_dtype)
        configs = {name: encoders for name in self.adapter.encoders} if config.stream_frozen else {}
        return configs | {self.adapter.trainable_model: frozen}

    def _build_cache(self) -> None:
        folder = self.output / "cache"
        written = build_cache(self.adapter, self.pipe, self.dataset, folder, self.model_name, self.rank, self.world)
        self.accelerator.wait_for_everyone()
        self.say(f"cache: {len(self.dataset.samples)} samples in {folder} ({written} encoded by process {self.rank})")
        if not (self.config.sample_every or self.config.sample_at):
            for name in self.adapter.encoders:  # not needed any more: give the device memory back
                module = getattr(self.pipe, name, None)
                if isinstance(module, nn.Module) and _unmanaged(module):
                    module.to("cpu")

    def _make_trainable(self) -> nn.Module:
        config = self.config
        model = getattr(self.pipe, self.adapter.trainable_model)
        if config.mode == "lora":
            patterns = config.lora_targets or self.adapter.default_lora_targets
            self.targets = resolve_targets(model, patterns)
            initial = self._initial_lora(model) if config.lora_init else None
            add_lora(model, self.targets, config.lora_rank, config.lora_alpha, config.lora_dropout, self.device)
            if initial is not None:
                load_lora_state(model, initial)
            self.say(f"LoRA rank {config.lora_rank} alpha {config.lora_alpha} on {len(self.targets)} layers")
        else:
            unsupported = [name for name in config.trainable if name != self.adapter.trainable_model]
            if unsupported:
                raise ValueError(
                    f"trainable={config.trainable}: full training supports {self.adapter.trainable_model!r} "
                    f"for this family; {unsupported} cannot be trained yet"
                )
            if not _unmanaged(model):
                raise ValueError("full training needs the model's weights in memory; turn off fp8/streaming")
            model.to(torch.float32).requires_grad_(True)
            count = sum(p.numel() for p in model.parameters())
            self.say(f"full training of {self.adapter.trainable_model}: {count:,} parameters")
        model.train()
        self.generator = torch.Generator().manual_seed(config.seed * 7919 + 104729 * self.rank + 1)
        return model

    def _initial_lora(self, model: nn.Module) -> dict:
        from ds_pipelines.lora import lora_layers, parse_lora, read_lora

        pieces, _ = parse_lora(read_lora(self.config.lora_init))
        layers, unmatched = lora_layers(pieces, model, self.pipe.lora_targets())
        if unmatched:
            warnings.warn(f"lora_init: {len(unmatched)} entries match no layer (first: {unmatched[:3]})", stacklevel=3)
        return layers

    def _print_memory_estimate(self) -> None:
        if not (self.config.print_memory_estimate and self.main):
            return
        model, config = self.model, self.config
        model_config = getattr(unwrap_model(model), "config", None)
        hidden = getattr(model_config, "hidden_size", 0) or getattr(model_config, "dim", 0) or 0
        tokens = self.adapter.estimated_tokens(self.pipe, self.height, self.width, self.num_frames)
        estimate = estimate_training_memory(
            model,
            resident_frozen_bytes=None,
            optimizer=config.optimizer,
            batch_size=config.batch_size,
            tokens=tokens,
            hidden=hidden,
            blocks=len(self.adapter.blocks(model)),
            activation_dtype=self.weight_dtype,
            checkpointing=config.gradient_checkpointing,
        )
        self.say(estimate.describe())

    def _resume_weights(self) -> tuple[int, Path | None]:
        if not self.config.resume:
            return 0, None
        path = latest_checkpoint(self.output / "checkpoints")
        if path is None:
            self.say("resume: no checkpoint found; starting at step 0")
            return 0, None
        trainable, optimizer_state, state = read_checkpoint(path)
        missing = [name for name in self.trainable_names if name not in trainable]
        if missing:
            raise ValueError(f"{path}: checkpoint lacks trainable weights {missing[:3]} (different targets or mode?)")
        with torch.no_grad():
            parameters = dict(self.model.named_parameters())
            for name in self.trainable_names:
                parameters[name].copy_(trainable[name])
        self.optimizer.load_state_dict(optimizer_state)
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.losses = [float(loss) for loss in state.get("losses", [])]  # "nan" strings read back as NaN
        self.say(f"resumed from {path} at step {state['step']}")
        return int(state["step"]), path

    # ------------------------------------------------------------------ data
    def _batches(self, start: int) -> Any:
        plan = BatchPlan(self.dataset, self.config.batch_size, self.config.seed, self.rank, self.world)
        plan.start = start * self.config.gradient_accumulation
        if self.config.cache:
            dataset = _CachedSamples(self.output / "cache", len(self.dataset.samples))
            loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=plan, collate_fn=_stack_cached, num_workers=self.config.num_workers
            )
        else:
            loader = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=plan, collate_fn=collate, num_workers=self.config.num_workers
            )
        return iter(loader)

    def _encode(self, batch: dict) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """A batch's conditions and latents on the device; uncached batches are encoded sample by sample."""
        if "items" in batch:  # cached: (conditions, latents, the sample's own empty prompt or None)
            conditions = [c for c, _, _ in batch["items"]]
            latents = [latent for _, latent, _ in batch["items"]]
            owns = [own for _, _, own in batch["items"]]

            def own_empty(index: int) -> dict[str, torch.Tensor] | None:
                return owns[index]
        else:
            extras = batch.get("extras") or [{}] * len(batch["prompt"])
            encoded = [
                encode_sample(self.adapter, self.pipe, p, t, x)
                for p, t, x in zip(batch["pixels"], batch["prompt"], extras, strict=True)
            ]
            conditions, latents = [c for c, _ in encoded], [latent for _, latent in encoded]

            def own_empty(index: int) -> dict[str, torch.Tensor] | None:
                return encode_sample_empty_prompt(self.adapter, self.pipe, extras[index])

        if self.config.caption_dropout:
            drop = torch.rand(len(conditions), generator=self.generator) < self.config.caption_dropout
            for index in torch.nonzero(drop).flatten().tolist():
                # Only the prompt's conditions: a first frame or reference latents stay. A sample whose prompt
                # encoding reads its extra images (an edit instruction) gets the empty prompt seen with them.
                empty = own_empty(index) or self._empty_conditions()
                conditions[index] = {
                    k: empty[k].to(v.device, v.dtype) if k in empty else v for k, v in conditions[index].items()
                }
        stacked = stack_conditions(conditions, self.adapter.ragged_conditions)
        stacked = {k: v.to(self.device, self.weight_dtype) for k, v in stacked.items()}
        return stacked, torch.stack(latents).to(self.device, self.weight_dtype)

    def _empty_conditions(self) -> dict[str, torch.Tensor]:
        if not hasattr(self, "_empty"):
            if self.config.cache:
                self._empty = load_cached(self.output / "cache" / "empty.safetensors")[0]
            else:
                self._empty = encode_sample(self.adapter, self.pipe, None, "")[0]
        return self._empty

    # ------------------------------------------------------------------ the loop
    def _loss(self, conditions: dict[str, torch.Tensor], latents: torch.Tensor) -> torch.Tensor:
        from ds_pipelines.schedulers import FlowMatchScheduler

        noise = torch.randn(latents.shape, generator=self.generator, dtype=torch.float32)
        sigmas = self.adapter.sample_sigmas(self.pipe, latents, self.generator, self.sampling)
        noise = noise.to(latents.device)
        noisy = FlowMatchScheduler.add_noise(latents, noise, sigmas)
        target = FlowMatchScheduler.velocity_target(latents.float(), noise)
        prediction = self.adapter.predict(self.prepared, noisy, sigmas, conditions)
        error = (prediction.float() - target).pow(2)
        mask = self.adapter.loss_mask(conditions, latents)
        if mask is None:
            per_sample = error.flatten(1).mean(1)
        else:  # the mean over the values that count
            mask = mask.expand_as(error)
            per_sample = (error * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1)
        return (per_sample * self.adapter.loss_weight(sigmas, self.weighting).to(per_sample.device)).mean()

    def _loop(self, start: int) -> TrainingResult:
        config, accelerator = self.config, self.accelerator
        batches = self._batches(start)
        log = RunLog(self.output, start, config.tensorboard) if self.main else None
        step, began, interrupted, boundary = start, time.perf_counter(), False, None
        guard = contextlib.ExitStack()  # after a Ctrl-C: further ones do not stop the save
        self.say(f"training {config.mode} for {config.steps} steps (from step {start}) on {self.world} process(es)")
        try:
            while step < config.steps:
                tick = time.perf_counter()
                boundary = rng_state({"noise": self.generator})  # what a checkpoint of ``step`` must restore
                total = 0.0
                for micro in range(config.gradient_accumulation):
                    conditions, latents = self._encode(next(batches))
                    last = micro == config.gradient_accumulation - 1
                    with contextlib.nullcontext() if last else accelerator.no_sync(self.prepared):
                        loss = self._loss(conditions, latents)
                        accelerator.backward(loss / config.gradient_accumulation)
                    total += loss.detach().float().item() / config.gradient_accumulation
                if config.max_grad_norm:
                    accelerator.clip_grad_norm_(self.parameters, config.max_grad_norm)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                step += 1
                mean = accelerator.reduce(torch.tensor(total, device=self.device), "mean").item()
                self.losses.append(mean)
                elapsed = time.perf_counter() - tick
                if log is not None and (step % config.log_every == 0 or step == config.steps):
                    samples = config.batch_size * config.gradient_accumulation * self.world
                    lr = self.lr_scheduler.get_last_lr()[0]
                    log.log(step, mean, lr, samples / elapsed, elapsed, time.perf_counter() - began)
                if config.checkpoint_every and (step % config.checkpoint_every == 0 or step == config.steps):
                    self._checkpoint(step)
                if self._sample_due(step):
                    self._sample(step)
        except KeyboardInterrupt:
            interrupted = True
            guard.enter_context(_deferred_interrupts(self.say, f"the checkpoint and weights at step {step}"))
            self.say(f"interrupted: saving a checkpoint at step {step}; wait for it, another Ctrl-C does not stop it")
            try:
                self.optimizer.zero_grad(set_to_none=True)
                if step > start and boundary is not None:
                    # The random state as it was when step ``step`` had finished, not mid-way through the next one.
                    self._checkpoint(step, boundary)
            except BaseException:
                guard.close()
                raise
        finally:
            if log is not None:
                log.close()
        with guard:
            return self._finish(step, interrupted)

    def _sample_due(self, step: int) -> bool:
        config = self.config
        if not config.sample_prompts:
            return False
        return step in config.sample_at or bool(config.sample_every and step % config.sample_every == 0)

    def _sample(self, step: int) -> None:
        if self.main:
            folder = self.output / "samples"
            folder.mkdir(parents=True, exist_ok=True)
            self.model.eval()
            item = self.dataset[0]
            reference = item["pixels"]  # image-to-video models sample from its first frame
            # Edit and ControlNet models sample with its extra images (passed only when there are some).
            extras = {"extras": item["extras"]} if item.get("extras") else {}
            for index, prompt in enumerate(self.config.sample_prompts):
                result = self.adapter.sample(
                    self.pipe,
                    prompt,
                    self.config.sample_seed + index,
                    self.height,
                    self.width,
                    self.config.sample_inference_steps,
                    self.num_frames,
                    reference,
                    **extras,
                )
                self.samples.append(self.adapter.save_sample(result, folder / f"step-{step:06d}-{index}"))
            self.model.train()
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ saving
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        state = self.accelerator.get_state_dict(self.prepared)
        names = set(self.trainable_names)
        return {k: v for k, v in state.items() if k in names}

    def _checkpoint(self, step: int, rng: tuple | None = None) -> None:
        folder = self.output / "checkpoints"
        self.accelerator.wait_for_everyone()
        try:
            write_rng(staging_folder(folder, step), self.rank, *(rng or rng_state({"noise": self.generator})))
        except BaseException:
            # A failed write (disk full, Ctrl-C) leaves the previous checkpoints as they were, and no staging folder.
            shutil.rmtree(staging_folder(folder, step), ignore_errors=True)
            raise
        trainable = self._trainable_state()
        self.accelerator.wait_for_everyone()
        if self.main:
            state = {
                "step": step,
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "losses": self.losses,
                "mode": self.config.mode,
                "world": self.world,
            }
            path = finish_checkpoint(
                folder, step, trainable, self.optimizer.state_dict(), state, self.config.keep_checkpoints
            )
            self.say(f"checkpoint {path}")
        self.accelerator.wait_for_everyone()

    def _finish(self, step: int, interrupted: bool) -> TrainingResult:
        config = self.config
        self.accelerator.wait_for_everyone()
        weights_path, components = None, {}
        if config.mode == "lora":
            layers = lora_state(self.accelerator.unwrap_model(self.prepared), config.lora_alpha)
            if self.main:
                from ds_pipelines.lora_io import save_lora_file

                weights_path = self.output / "lora.safetensors"
                save_lora_file(
                    {name: (down, up, alpha) for name, (down, up, alpha) in layers.items()},
                    weights_path,
                    format=config.lora_format,
                    family=self.adapter.family,
                    metadata=self._lora_metadata(step),
                )
        else:
            state = self.accelerator.get_state_dict(self.prepared)
            if self.main:
                weights_path = self.output / f"{self.adapter.trainable_model}.safetensors"
                save_file_atomic(
                    {k: v for k, v in state.items() if v.device.type != "meta"},
                    weights_path,
                    {"ds_train.step": str(step)},
                )
                components[self.adapter.trainable_model] = weights_path
        if self.main:
            draw_loss_curve(self.output / "log.csv", self.output / "loss.png")
            self.say(f"done at step {step}; weights: {weights_path}")
        self.accelerator.wait_for_everyone()
        return TrainingResult(
            output=self.output,
            weights_path=weights_path
            if self.main
            else self.output
            / ("lora.safetensors" if config.mode == "lora" else f"{self.adapter.trainable_model}.safetensors"),
            steps=step,
            final_loss=self.losses[-1] if self.losses else None,
            losses=list(self.losses),
            component_paths=components,
            interrupted=interrupted,
            samples=self.samples,
            dropped_rows=len(self.dataset.broken),
        )

    def _lora_metadata(self, step: int) -> dict[str, str]:
        config = self.config
        return {
            "base_model": self.model_name,
            "rank": str(config.lora_rank),
            "alpha": str(config.lora_alpha),
            "steps": str(step),
            "trigger_words": ", ".join(config.trigger_words),
            "resolution": f"{self.width}x{self.height}",
            "learning_rate": str(config.learning_rate),
            "num_train_images": str(len(self.dataset.samples)),
            "targets": ",".join(config.lora_targets or self.adapter.default_lora_targets),
        }


@contextlib.contextmanager
def _deferred_interrupts(say: Callable[[str], None], what: str, presses: int = 3) -> Iterator[None]:
    """Ctrl-C while ``what`` is being saved says that the save goes on; the ``presses``-th one abandons it, saying
    that ``what`` was not written. Only the main thread can take signals; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    count = 0

    def handler(signum: int, frame: object) -> None:
        nonlocal count
        count += 1
        if count >= presses:
            signal.signal(signal.SIGINT, previous)
            say(f"abandoned: {what} was NOT written")
            raise KeyboardInterrupt
        say(f"still saving {what}; press Ctrl-C {presses - count} more time(s) to abandon it")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class _CachedSamples(torch.utils.data.Dataset):
    def __init__(self, folder: Path, count: int):
        self.folder, self.count = folder, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict | None]:
        return load_cached_sample(self.folder / f"{index % self.count:06d}.safetensors")


def _stack_cached(items: list) -> dict:
    """Cached samples stay a list: ``_encode`` drops captions per sample, then stacks (padding ragged prompts)."""
    return {"items": list(items)}


def _unmanaged(module: nn.Module) -> bool:
    from ds_pipelines import get_vram_handle

    return get_vram_handle(module) is None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy

        numpy.random.seed(seed % 2**32)
    except ImportError:
        pass
