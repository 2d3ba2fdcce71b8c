"""The DeepSpeed trainer: ONE loop for `dupmae pretrain` and `dupmae finetune`.

What differs between pre-training and fine-tuning is a small task object (`engine/pretrain.py`,
`engine/finetune/task.py`): it builds the model, the dataset, sampler and collator, counts what a batch holds,
computes the loss of a micro batch from the global batch's counts, names the logged parts, and evaluates.
DeepSpeed set-up, the step, checkpoints, resume, signals and logging live here and never name a model.

One optimizer step = `grad_accum` micro batches on every rank. Losses are normalized by counts over the
WHOLE global batch (for pre-training masked tokens for L_mlm, ordinary tokens for L_dec, samples for L_bow;
for fine-tuning queries; one small all-reduce per step), so the update equals that of one process on the
global batch, whatever the split into ranks and micro steps.

The model is put in training mode before the first step (a model loaded with `from_pretrained` starts in eval
mode, which would train without dropout until the first evaluation, and a resumed run would differ).

Run directory (train.run_dir):
    config.toml          the resolved configuration
    deepspeed.json       the DeepSpeed configuration it generated (or merged with yours)
    metrics.jsonl        rank 0: one JSON line per optimizer step (loss parts, lr, grad norm, timings)
                         and per evaluation
    tensorboard/         rank 0: scalars, the optimizer step as x-axis
    checkpoints/         see checkpoint.py; `latest_complete` names the newest complete one

Exit codes: 0 done; 75 stopped by SIGTERM/SIGUSR1 after saving a checkpoint (run the same command again
to resume; batch scripts requeue on it); 74 (sysexits' EX_IOERR) the disk or quota was full while writing a
checkpoint (on any rank; every rank stops with it, the message names the file and the free space; the older
checkpoint is the resume point: free space, then run the same command again; not requeued, since a requeued job
would find the disk as full); 69 (sysexits' EX_UNAVAILABLE) another rank stopped answering: a collective got no
answer within train.dist_timeout_s (a hung or stopped rank, a lost node) or its peer went away (a killed rank);
the message names the rank(s), the step and what the ranks were doing; the last complete checkpoint is the
resume point; 3 too many non-finite losses; 2 configuration or data errors.
"""
from __future__ import annotations

import json
import math
import signal
import sys
import time
import warnings
from pathlib import Path

import torch

from . import checkpoint, distributed
from .config import ConfigError, RunConfig, to_toml
from .metrics import TensorBoard, cpu_bf16_native, device_peak_flops, format_duration, peak_memory_bytes

EXIT_OK = 0
EXIT_BAD_LOSS = 3
EXIT_RANK_LOST = 69
EXIT_DISK_FULL = 74
EXIT_PREEMPTED = 75


class TrainingError(RuntimeError):
    pass


class RankLostError(RuntimeError):
    """Another rank stopped answering (a collective timed out, or its peer went away): names the rank(s), the
    step and what the ranks were doing. Exit 69."""


def deepspeed_config(cfg: RunConfig, world_size: int, passes_per_micro: int = 1) -> dict:
    """The DeepSpeed JSON for this run; a user's JSON (train.deepspeed_config) is merged underneath, and
    its batch sizes must agree with ours. With several backward passes per micro batch (gradient caching),
    each pass is a DeepSpeed micro step: its accumulation counts passes."""
    d, z = cfg.data, cfg.zero
    ours = {
        "train_micro_batch_size_per_gpu": d.micro_batch,
        "gradient_accumulation_steps": d.grad_accum * passes_per_micro,
        "train_batch_size": d.micro_batch * d.grad_accum * passes_per_micro * world_size,
        "gradient_clipping": cfg.optim.grad_clip,  # DeepSpeed clips at 1.0 when the key is absent
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": z.stage, "reduce_bucket_size": z.reduce_bucket_size,
                              "overlap_comm": z.overlap_comm, "contiguous_gradients": True},
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        "fp16": {"enabled": cfg.train.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
    }
    if z.offload_optimizer:
        ours["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if z.stage == 3:
        ours["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    if not cfg.train.deepspeed_config:
        return ours
    path = Path(cfg.train.deepspeed_config)
    try:
        user = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"train.deepspeed_config: {path} not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.deepspeed_config: {path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        if key in user and user[key] != ours[key]:
            raise ConfigError(f"{path}: {key} = {user[key]} conflicts with the recipe's {ours[key]} "
                              f"(data.micro_batch {d.micro_batch} x data.grad_accum {d.grad_accum} x "
                              f"{world_size} ranks); set the batch in the recipe, or make them agree")
    if "optimizer" in user or "scheduler" in user:
        raise ConfigError(f"{path}: 'optimizer' and 'scheduler' come from the recipe's [optim] section")
    return _merge_user_config(ours, user, path)


def _merge_user_config(ours: dict, user: dict, path: Path, prefix: str = "") -> dict:
    """The user's keys added to ours; a key the recipe also sets must agree (no silent precedence)."""
    merged = dict(ours)
    for key, value in user.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge_user_config(merged[key], value, path, f"{prefix}{key}.")
        elif key in merged and merged[key] != value:
            raise ConfigError(f"{path}: {prefix}{key} = {json.dumps(value)} contradicts the recipe's "
                              f"{json.dumps(merged[key])}; set it in the recipe (see deepspeed.json in the run dir "
                              "for what the recipe generates), or remove it from the JSON")
        else:
            merged[key] = value
    return merged


def lr_lambda(cfg: RunConfig):
    o, total = cfg.optim, cfg.train.max_steps
    warmup = int(round(o.warmup * total)) if o.warmup < 1 else int(o.warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if o.schedule == "constant":
            return 1.0
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        if o.schedule == "linear":
            return o.min_lr_ratio + (1 - o.min_lr_ratio) * (1 - progress)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def skippable(optimizer_cls: type) -> type:
    """`optimizer_cls` whose step() does nothing while `skip` is set: a skipped (non-finite) step must not
    touch the moments or the step count either. DeepSpeed's ZeRO wrappers call step() of this optimizer."""

    class Skippable(optimizer_cls):
        skip = False

        def step(self, *args, **kwargs):
            if self.skip:
                return None
            return super().step(*args, **kwargs)

    Skippable.__name__ = Skippable.__qualname__ = f"Skippable{optimizer_cls.__name__}"
    return Skippable


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float | None = None, lr_scale=None) -> list[dict]:
    """AdamW groups: no weight decay on biases and LayerNorm weights (any 1-D parameter). `lr_scale(name)`, where
    given, is a multiplier of `lr` per parameter: the parameters whose multiplier is not 1 get groups of their own
    (after the two plain groups, so that group 0 keeps the recipe's lr, which the logs report); the schedule
    scales every group alike."""
    groups: dict[tuple[bool, float], list] = {(True, 1.0): [], (False, 1.0): []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            scale = float(lr_scale(name)) if lr_scale is not None else 1.0
            groups.setdefault((not (p.ndim < 2 or name.endswith(".bias")), scale), []).append(p)
    out = []
    for (decay, scale), params in groups.items():
        if scale != 1.0 and not params:
            continue
        group = {"params": params, "weight_decay": weight_decay if decay else 0.0}
        if scale != 1.0:
            if lr is None:
                raise ValueError("param_groups: a learning-rate multiplier needs the base lr")
            group["lr"] = lr * scale
        out.append(group)
    return out


class Trainer:
    """`Trainer(cfg, task)`: `task` defaults to pre-training (`engine/pretrain.py`)."""

    def __init__(self, cfg, task=None, log=None):
        import deepspeed

        # DeepSpeed's ZeRO still calls this torch collective under its deprecated name, every step
        warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
        if task is None:
            from .pretrain import PretrainTask

            task = PretrainTask(cfg)
        self.cfg = cfg
        self.task = task
        self.rank, self.world, self.local_rank = distributed.init(cfg.train.dist_timeout_s)
        self._log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.run_dir = Path(cfg.train.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.device = torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cpu" and cfg.train.precision == "bf16" and not cpu_bf16_native() and self.rank == 0:
            self.log("[warning] train.precision = bf16 on a CPU without AVX512-BF16 or AMX: its bf16 matrix "
                     "products are emulated and run several times slower than fp32 (benchmarks/bench_bf16_cpu.py); "
                     "use train.precision = fp32 on this machine")

        # data: the task's dataset, sampler (data order: a function of seed and position) and collator
        task.setup_data(self.world, self.rank)
        self.dataset, self.sampler, self.collator = task.dataset, task.sampler, task.collator
        # the files the dataset opened (size, mtime, checksum), recorded in each checkpoint: a resume on changed
        # data is refused (a dataset without files to record, e.g. fine-tuning's jsonl, records None)
        files = getattr(self.dataset, "data_files", None)
        self.data_files = files() if files else None

        torch.manual_seed(cfg.train.seed)
        model = task.build_model()
        if cfg.train.activation_checkpointing:  # non-reentrant: works with DeepSpeed and the custom kernels' autograd
            enable = getattr(model.lm, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:  # transformers before the rename
                model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for p in task.external_parameters(model):  # ZeRO-3: weights used outside their module's forward
            deepspeed.zero.register_external_parameter(model, p)

        o = cfg.optim
        groups = param_groups(model, o.weight_decay, o.lr, getattr(task, "lr_scale", None))
        if cfg.zero.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = skippable(DeepSpeedCPUAdam)(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                                    adamw_mode=True)
        else:
            optimizer = skippable(torch.optim.AdamW)(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
        self.base_optimizer = optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        self.ds_config = deepspeed_config(cfg, self.world, getattr(task, "passes_per_micro", 1))
        resume = self._find_checkpoint()
        if resume and resume[1] != resume[0]:
            self.ds_config["checkpoint"] = {"load_universal": True}
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config)
        self.model = self.engine.module

        self.step = 0
        self.bad_steps = 0
        self._loaded: tuple[str, int] | None = None  # (tag, step) of the checkpoint this run resumed from
        self._saved: tuple[str, int] | None = None  # (tag, step) of the last checkpoint this run saved
        self._stop_signal: int | None = None
        self._doing = "starting"  # what the ranks are doing, for the message when a rank stops answering
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.toml").write_text(to_toml(cfg), encoding="utf-8")
            (self.run_dir / "deepspeed.json").write_text(json.dumps(self.ds_config, indent=2), encoding="utf-8")
        self.tb = TensorBoard(self.run_dir / "tensorboard", cfg.logging.tensorboard and self.rank == 0)
        if resume:
            self._resume(*resume)

    # -- state --------------------------------------------------------------------------------------

    def log(self, msg: str) -> None:
        if self.rank == 0:
            self._log(msg)

    def state_dict(self) -> dict:
        return {"step": self.step, "consumed_samples": self.sampler.consumed_samples, "bad_steps": self.bad_steps,
                "config_digest": self.cfg.digest(), "world_size": self.world, "sampler": self.sampler.state_dict()}

    def _find_checkpoint(self) -> tuple[str, str] | None:
        """(tag, tag to load) of the checkpoint to resume from; a checkpoint written by another number of
        ranks is converted to DeepSpeed's universal format first and loaded from that copy.

        The newest complete checkpoint is verified against the checksums its marker recorded; a damaged one is
        set aside with a warning naming its file and the next older complete one is tried, until none is left
        (an error naming the files). Then the data this run reads must be the data the checkpoint was trained
        on, and the ZeRO stage and precision ones DeepSpeed can load it with."""
        tags = checkpoint.complete_checkpoints(self.ckpt_dir) if self.cfg.checkpoint.resume else []
        if not tags:
            return None
        for i, tag in enumerate(tags):
            try:
                marker = checkpoint.read_marker(self.ckpt_dir, tag)
            except checkpoint.CheckpointError as e:
                marker, problems = {}, [str(e)]
            else:
                problems = checkpoint.verify(self.ckpt_dir, tag, marker)
            if problems is None:
                self.log(f"[{self.task.name}] note: {self.ckpt_dir / tag} records no checksums (saved by an older "
                         "version): loading it unverified")
                break
            if not problems:
                break
            damage = "; ".join(problems)
            if i + 1 == len(tags):
                raise checkpoint.CheckpointError(
                    f"{self.ckpt_dir / tag} is damaged: {damage}. No older complete checkpoint is left in "
                    f"{self.ckpt_dir} to fall back to: restore the file from a copy and run again, or start afresh "
                    "in a new train.run_dir")
            self.log(f"[{self.task.name}] [warning] {self.ckpt_dir / tag} is damaged: {damage}. Setting it aside "
                     f"({checkpoint.DAMAGED}) and falling back to {self.ckpt_dir / tags[i + 1]}")
            checkpoint.set_aside(self.ckpt_dir, tag, problems)
        if i:
            checkpoint.set_pointer(self.ckpt_dir, tag)
        if marker.get("config_digest") not in (None, self.cfg.digest()):
            raise ConfigError(f"{self.ckpt_dir / tag} was written with another model or data configuration "
                              "(config hash differs): use a new train.run_dir, or checkpoint.resume=false")
        self._check_setup(tag, marker)
        self._check_data(tag, marker)
        saved_world = marker.get("world_size", self.world)
        if saved_world == self.world:
            return tag, tag
        saved_step = marker.get("step", 0)
        saved_global = marker.get("consumed_samples", 0) // saved_step if saved_step else None
        if saved_global and saved_global != self.sampler.global_batch:
            raise ConfigError(f"{self.ckpt_dir / tag} was trained with a global batch of {saved_global}; this job's "
                              f"is {self.sampler.global_batch}: set data.micro_batch x data.grad_accum x ranks "
                              "to the same global batch so the data order is preserved")
        self.log(f"[{self.task.name}] {tag} was written by {saved_world} rank(s), this job has {self.world}: "
                 "converting it to a universal checkpoint")
        return tag, checkpoint.to_universal(self.ckpt_dir, tag)

    def _check_setup(self, tag: str, marker: dict) -> None:
        """The recipe's ZeRO stage and precision must be ones DeepSpeed can load the checkpoint with: the same,
        or ZeRO 1 <-> 2 (one optimizer class and checkpoint layout; the resumed losses are identical)."""
        stage, precision = checkpoint.saved_setup(self.ckpt_dir, tag, marker)
        want_stage, want_precision = self.cfg.zero.stage, self.cfg.train.precision
        family = {0: "0", 1: "1 or 2", 2: "1 or 2", 3: "3"}
        same_stage = family[stage] == family[want_stage] if isinstance(stage, int) else family[want_stage] == stage
        same_precision = precision in (None, want_precision)
        if same_stage and same_precision:
            if isinstance(stage, int) and stage != want_stage:
                self.log(f"[{self.task.name}] {tag} was saved with ZeRO-{stage}, resuming with ZeRO-{want_stage} "
                         "(the same optimizer state layout)")
            return
        saved = f"ZeRO-{stage}" + (f" and {precision}" if precision else "")
        raise ConfigError(
            f"{self.ckpt_dir / tag} was saved with {saved}; this recipe asks for ZeRO-{want_stage} and "
            f"{want_precision} (zero.stage, train.precision). DeepSpeed cannot load a checkpoint into another "
            "ZeRO stage (except 1 <-> 2) or precision: resume with the saved zero.stage and train.precision, or "
            f"export it (dupmae export {self.run_dir} OUT_DIR) and start a new run (a new train.run_dir) whose "
            "model.encoder is OUT_DIR: the weights carry over, the optimizer state starts afresh")

    def _check_data(self, tag: str, marker: dict) -> None:
        """The data files must be those the checkpoint was trained on (`data_pipeline.dataset.changed_files`:
        size and mtime first, the checksum only where they differ); one local rank per node checks."""
        recorded = marker.get("data_files")
        if recorded is None or self.data_files is None:
            if self.data_files is not None:
                self.log(f"[{self.task.name}] note: {self.ckpt_dir / tag} records no data files (saved by an older "
                         "version): the data is not compared")
            return
        from dupmae.data_pipeline.dataset import changed_files

        problems = changed_files(recorded, self.data_files) if self.local_rank == 0 else []
        problems = sorted({p for part in distributed.gather_objects(problems) for p in part})
        if problems:
            from dupmae.data_pipeline.shards import ShardError

            raise ShardError(f"the data changed since {self.ckpt_dir / tag} was saved: " + "; ".join(problems)
                             + ". Training on would silently mix other data into this run: put the files back as "
                             "they were, or start a new run (a new train.run_dir) on the new data")

    def _resume(self, tag: str, load_tag: str) -> None:
        state = checkpoint.load(self.engine, self.ckpt_dir, load_tag, rng_tag=tag)
        self.step = int(state["step"])
        self._loaded = (tag, self.step)
        self.bad_steps = int(state.get("bad_steps", 0))
        self.sampler.load_state_dict(state["sampler"])
        # the optimizer holds the lr of the step it last took; the schedule (max_steps may have changed) decides
        factor = lr_lambda(self.cfg)(self.step)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * factor
        self.log(f"[{self.task.name}] resumed from {self.ckpt_dir / load_tag}: step {self.step}, "
                 f"{self.sampler.consumed_samples:,} samples consumed")

    def save(self) -> None:
        tag = checkpoint.tag_for(self.step)
        if (tag, self.step) in (self._loaded, self._saved) and (self.ckpt_dir / tag / checkpoint.MARKER).is_file():
            # resumed at this very step, or saved it already (a stop signal during the periodic save), and trained
            # none since: the checkpoint holds this state already, and saving it again would first make it
            # incomplete (with keep_last 1 nothing complete would be left meanwhile)
            self.log(f"[{self.task.name}] checkpoint {self.ckpt_dir / tag} already holds step {self.step}")
            return
        extra = {"zero_stage": self.cfg.zero.stage, "precision": self.cfg.train.precision}
        if self.data_files is not None:
            extra["data_files"] = self.data_files
        tag = checkpoint.save(self.engine, self.ckpt_dir, self.step, self.state_dict(),
                              self.cfg.checkpoint.keep_last, self.cfg.checkpoint.keep_every, marker_extra=extra)
        self._saved = (tag, self.step)
        self.log(f"[{self.task.name}] saved checkpoint {self.ckpt_dir / tag}")

    # -- signals ------------------------------------------------------------------------------------

    def _on_signal(self, signum, _frame) -> None:
        self._stop_signal = signum  # only a flag: the ranks agree on it at the next step boundary

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)

    # -- the loop -----------------------------------------------------------------------------------

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _grad_norm_zero0(self) -> float | None:
        """The global gradient norm before clipping, which DeepSpeed does not keep at ZeRO stage 0 (the
        gradients are already averaged over ranks when the last backward of a step returns)."""
        if self.cfg.zero.stage != 0:
            return None
        norms = [p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    def _global_counts(self, micro: list[dict]) -> dict[str, float]:
        """The task's named counts of this step's micro batches, summed over every rank (one all-reduce)."""
        counts: dict[str, float] = {}
        for b in micro:
            for k, v in self.task.batch_counts(b).items():
                counts[k] = counts.get(k, 0.0) + float(v)
        return dict(zip(counts, distributed.all_reduce(list(counts.values()))))

    def _optimizer_step(self, micro: list[dict], glob: dict[str, float]) -> tuple[dict, float, float, bool]:
        """Forward/backward of this rank's micro batches and one optimizer step.

        The task divides its losses by the global batch's counts (`glob`) over `scale` = ranks x accumulation
        steps, because DeepSpeed averages gradients over ranks and scales each backward by 1/grad_accum. A task
        may take several backward passes per micro batch (gradient caching: one per chunk of texts), each a
        DeepSpeed micro step, the first carrying the loss parts. If any rank sees a non-finite loss, every
        rank's optimizer skips the step (the lr schedule still advances: lr is a function of the step).
        Returns (summed loss parts of this rank, lr used, grad norm or None, skipped).

        The parts may be tensors: they are read (one host synchronization) only after the step's last
        backward has been queued, so the GPU never idles while the host waits between forward and backward.
        A non-finite loss then leaves non-finite gradients behind, which the skipped optimizer step never
        applies (DeepSpeed clears them at the step boundary)."""
        scale = self.world * self.cfg.data.grad_accum
        parts = dict.fromkeys(self.task.part_names, 0.0)
        lr = self.optimizer.param_groups[0]["lr"]
        skipped, gnorm = False, None
        n_passes = getattr(self.task, "passes_per_micro", 1)
        firsts = []  # the parts of each micro batch's first pass, unread
        sched_before = self.scheduler.last_epoch
        for i, b in enumerate(micro):
            for j, (loss, out_parts) in enumerate(self.task.passes(self.engine, self._to_device(b), glob, scale)):
                if j == 0:
                    firsts.append(out_parts)
                self.engine.backward(loss)
                if i == len(micro) - 1 and j == n_passes - 1:
                    read = [{k: float(v) for k, v in p.items()} for p in firsts]
                    bad = not all(math.isfinite(p["loss"]) for p in read)
                    skipped = bool(distributed.all_reduce([1.0 if bad else 0.0], op="max")[0])
                    if not skipped:
                        for p in read:
                            for k, v in p.items():
                                parts[k] += v
                        gnorm = self._grad_norm_zero0()  # ZeRO-0: DeepSpeed clears the grads in step()
                    self.base_optimizer.skip = skipped
                self.engine.step()
        self.base_optimizer.skip = False
        if skipped and self.scheduler.last_epoch == sched_before:
            self.scheduler.step()  # DeepSpeed saw the non-finite gradients as an overflow and held the schedule
        if gnorm is None and not skipped:
            gnorm = self.engine.get_global_grad_norm()
        return parts, lr, float(gnorm) if gnorm is not None else float("nan"), skipped

    def train(self) -> int:
        cfg = self.cfg
        accum, world = cfg.data.grad_accum, self.world
        # before the DataLoader forks its workers: they inherit the flag-only handler, so a signal sent to
        # every process of a rank (scancel --signal, Slurm's time-limit TERM) does not kill them mid-batch
        self.install_signal_handlers()
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=self.sampler, collate_fn=self.collator,
            num_workers=cfg.data.num_workers, pin_memory=self.device.type == "cuda",
            persistent_workers=cfg.data.num_workers > 0,
            # its own generator: creating the iterator must not draw from the global RNG that dropout uses,
            # or a resumed run (RNG restored, then iterator created) would drift from an uninterrupted one
            generator=torch.Generator().manual_seed(cfg.data.seed))
        batches = iter(loader)
        peak = device_peak_flops()
        metrics = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") if self.rank == 0 else None
        window = {"time": 0.0, "wait": 0.0, "tokens": 0.0, "samples": 0.0, "flops": 0.0, "steps": 0}
        start_step, t_start = self.step, time.perf_counter()
        last = min(cfg.train.max_steps, cfg.train.stop_at_step or cfg.train.max_steps)
        name = self.task.name
        self.log(f"[{name}] {world} rank(s), global batch {self.sampler.global_batch} "
                 f"({cfg.data.micro_batch} x {accum} x {world}), {self.sampler.num_samples:,} training samples, "
                 f"steps {self.step} -> {cfg.train.max_steps}, ZeRO-{cfg.zero.stage}, {cfg.train.precision}, "
                 f"run dir {self.run_dir}")
        self.engine.train()  # from_pretrained returns eval mode: without this, no dropout until the first eval
        try:
            return self._loop(last, batches, metrics, peak, window, start_step, t_start)
        except RuntimeError as e:
            if self.world == 1 or not distributed.is_peer_lost(e):
                raise
            raise self._rank_lost(e) from e
        finally:
            if metrics:
                metrics.close()
            self.tb.close()

    def _rank_lost(self, e: RuntimeError) -> RankLostError:
        """The error for a collective that got no answer: which ranks stopped (asked at the job's store), when
        and in what, and where the run resumes."""
        who = distributed.unresponsive_ranks()
        if who is None:
            ranks = ("rank 0 (the job's store, which its process holds under the deepspeed launcher, does not answer "
                     "either)")
        elif who:
            ranks = f"rank{'s' if len(who) > 1 else ''} {', '.join(map(str, who))}"
        else:
            ranks = "another rank (every rank answered again afterwards: it went away or recovered)"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        try:
            latest = checkpoint.latest_complete(self.ckpt_dir)
        except (checkpoint.CheckpointError, OSError):
            latest = None
        resume = (f"the last complete checkpoint is {self.ckpt_dir / latest[0]}, from which it resumes" if latest else
                  "there is no complete checkpoint yet: it starts from step 0")
        return RankLostError(
            f"rank {self.rank}: {ranks} stopped answering: no answer within train.dist_timeout_s = "
            f"{self.cfg.train.dist_timeout_s} s (or the peer went away) during {self._doing} ({first}). A hung or "
            f"stopped process, or a lost node: this rank stops. End every process of the job, then run the same "
            f"command again; {resume}")

    def _loop(self, last, batches, metrics, peak, window, start_step, t_start) -> int:
        cfg, name = self.cfg, self.task.name
        accum, world = cfg.data.grad_accum, self.world
        while self.step < last:
            self._doing = f"the stop-signal check before step {self.step + 1}"
            if distributed.all_reduce([1.0 if self._stop_signal else 0.0], op="max")[0]:
                self._doing = f"the checkpoint save at step {self.step} (stop signal)"
                self.log(f"[{name}] stop requested by signal at step {self.step}: saving")
                self.save()
                return EXIT_PREEMPTED
            t0 = time.perf_counter()
            micro, wait = [], 0.0
            for _ in range(accum):
                tw = time.perf_counter()
                micro.append(next(batches))
                wait += time.perf_counter() - tw
            self._doing = f"the batch-count all-reduce of step {self.step + 1}"
            glob = self._global_counts(micro)
            self._doing = (f"forward, backward (ZeRO's gradient reduce) and optimizer step of step "
                           f"{self.step + 1}")
            parts, lr, gnorm, skipped = self._optimizer_step(micro, glob)
            self.step += 1
            self.sampler.consumed_samples += self.sampler.global_batch
            if skipped:
                self.bad_steps += 1
                self.log(f"[{name}] step {self.step}: non-finite loss, step skipped "
                         f"({self.bad_steps}/{cfg.train.max_bad_steps})")
                if self.bad_steps >= cfg.train.max_bad_steps:
                    self.log(f"[{name}] {self.bad_steps} non-finite losses: stopping (lower optim.lr, "
                             "check the data with `dupmae inspect`, or raise train.max_bad_steps)")
                    return EXIT_BAD_LOSS
                continue
            self._doing = f"the loss all-reduce of step {self.step}"
            reduced = distributed.all_reduce(list(parts.values()))
            values = {k: v / (world * accum) for k, v in zip(parts, reduced)}
            dt_step = time.perf_counter() - t0
            window["time"] += dt_step
            window["wait"] += wait
            window["tokens"] += glob["tokens"]
            window["samples"] += glob["samples"]
            window["flops"] += glob["flops"]
            window["steps"] += 1
            record = {"step": self.step, **values, "lr": lr,
                      "grad_norm": gnorm, "step_s": dt_step, "data_wait_s": wait, "tokens": int(glob["tokens"]),
                      "samples": int(glob["samples"]), "consumed_samples": self.sampler.consumed_samples}
            if metrics:
                try:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                except OSError as e:  # a full disk: name the file (a failed write names none); exit 74 in the CLI
                    raise OSError(e.errno, e.strerror, metrics.name) from e
            if self.step % cfg.logging.every == 0 or self.step == cfg.train.max_steps:
                self._report(record, window, peak, start_step, t_start)
                window = {k: 0.0 for k in window} | {"steps": 0}
            if cfg.train.eval_every and self.step % cfg.train.eval_every == 0:
                self._doing = f"the evaluation at step {self.step}"
                self.evaluate(metrics)
            if self.step % cfg.checkpoint.every == 0 and self.step < last:
                self._doing = f"the checkpoint save at step {self.step}"
                self.save()
        self._doing = f"the final checkpoint save at step {self.step}"
        self.save()
        what = "done" if self.step >= cfg.train.max_steps else f"stopped at train.stop_at_step {self.step}"
        self.log(f"[{name}] {what}: {self.step - start_step} steps in "
                 f"{format_duration(time.perf_counter() - t_start)}")
        return EXIT_OK

    def _report(self, record: dict, window: dict, peak: float | None, start_step: int, t_start: float) -> None:
        secs = max(window["time"], 1e-9)
        tokens_s, samples_s, flops_s = window["tokens"] / secs, window["samples"] / secs, window["flops"] / secs
        mfu = flops_s / (peak * self.world) if peak else 0.0
        wait_share = window["wait"] / secs
        mem = peak_memory_bytes()
        done = self.step - start_step
        eta = (time.perf_counter() - t_start) / max(done, 1) * (self.cfg.train.max_steps - self.step)
        names = self.task.part_names
        self.tb.log(self.step, {("loss/total" if k == "loss" else self.task.tensorboard_tag(k)): record[k]
                                for k in names} | {
            "lr": record["lr"], "grad_norm": record["grad_norm"],
            "throughput/tokens_per_s": tokens_s, "throughput/samples_per_s": samples_s,
            "throughput/mfu": mfu, "throughput/tflops": flops_s / 1e12, "time/step_s": secs / window["steps"],
            "time/data_wait_share": wait_share, "memory/peak": mem / 2**30,
        })
        speed = f"MFU {100 * mfu:.1f}%" if peak else f"{flops_s / 1e9:.1f} GFLOP/s"
        detail = " ".join(f"{k} {record[k]:.3f}" for k in names[1:] if k in self.task.console_parts)
        self.log(f"step {self.step}/{self.cfg.train.max_steps} | loss {record['loss']:.4f} ({detail}) | "
                 f"lr {record['lr']:.2e} | gnorm {record['grad_norm']:.3f} | {tokens_s:,.0f} tok/s "
                 f"{samples_s:,.1f} samples/s | {speed} | data {100 * wait_share:.0f}% | mem {mem / 2**30:.2f} GiB | "
                 f"ETA {format_duration(eta)}")

    def evaluate(self, metrics=None) -> dict:
        """The task's periodic evaluation (in eval mode; training mode is restored after it), logged."""
        self.engine.eval()
        try:
            with torch.no_grad():
                result, line = self.task.evaluate(self)
        finally:
            self.engine.train()
        if not result:
            return {}
        self.tb.log(self.step, result)
        if metrics:
            metrics.write(json.dumps({"step": self.step, **result}) + "\n")
        self.log(f"eval step {self.step} | {line}")
        return result

    def close(self) -> None:
        distributed.shutdown()


def run(cfg, task=None) -> int:
    trainer = Trainer(cfg, task)
    try:
        return trainer.train()
    finally:
        trainer.close()


__all__ = ["Trainer", "run", "deepspeed_config", "EXIT_OK", "EXIT_PREEMPTED", "EXIT_BAD_LOSS", "EXIT_DISK_FULL",
           "EXIT_RANK_LOST", "RankLostError"]
