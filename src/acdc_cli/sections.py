"""The sections of the settings (data, model, optim, schedule, sparsity, runtime, log): every field typed, with its
default, its bounds and a one-line description, and the checks within a section. :mod:`acdc_cli.config` composes them
into the one settings model and loads it from its layers.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_NM = re.compile(r"^(\d+):(\d+)$")


# Upper bounds on what a setting may ask for, so that a typo (epochs = 1e18) is refused in one line instead of filling
# the memory or running for ever. Each is far beyond any real run of this tool.
MAX_EPOCHS = 10_000  # 50 x the longest schedule of the paper (200 epochs)


MAX_BATCH_SIZE = 65_536  # 256 x the paper's ImageNet batch


MAX_SYNTHETIC_SIZE = 1_000_000  # synthetic images per split


MAX_WORKERS = 256  # loader worker processes


MAX_THREADS = 1024  # torch CPU threads (torch crashes at exit with ~10**5)


MAX_CONFIG_BYTES = 2**20  # a --config file (the presets are 1-3 kB)


DEFAULT_VAL_SIZE = 270  # held-out images of a dataset whose size is known (the digits' test split is as large)


# what a layer states for one dataset, which a layer above naming another dataset drops (merge_layer)
DATASET_SPECIFIC = ("val_size", "image_size", "mean", "std")


MAX_IMAGE_SIDE = 4096  # a model's input height or width (18 x ImageNet's 224); FLOPs and ONNX trace one such image


MAX_BENCH_STEPS = 100_000  # timed batches of one benchmark


class _Section(BaseModel):
    # inf and nan are refused for every float setting: no rate, decay, factor or fraction here means anything
    # non-finite, and a NaN compares false with every bound
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataSettings(_Section):
    name: Literal["digits", "cifar10", "cifar100", "imagenet", "imagefolder", "synthetic"] = Field(
        "digits", description="dataset: digits (ships with scikit-learn), cifar10, cifar100, imagenet, imagefolder "
        "(your own <dir>/train/<class>/<image> and <dir>/val/<class>/<image>), synthetic"
    )
    dir: Path | None = Field(None, description="dataset root folder (not needed for digits/synthetic); stored absolute")
    batch_size: int = Field(
        64, gt=0, le=MAX_BATCH_SIZE, description="global training batch size (split across ranks)"
    )
    eval_batch_size: int = Field(
        512, gt=0, le=MAX_BATCH_SIZE, description="batch size for validation and test passes"
    )
    val_size: int | None = Field(
        None, ge=0, description="images held out of the training split for per-epoch validation and model selection "
        "(0: every training image trains; per-epoch metrics and model selection use the test split, as the paper's "
        "runs; None: a tenth of the training images for imagefolder, 270 for the other datasets)"
    )
    image_size: int | None = Field(
        None, ge=8, le=MAX_IMAGE_SIDE, description="imagenet/imagefolder: side of the square training crop and evaluation centre "
        "crop in pixels (evaluation resizes the shorter side to 8/7 of it first); None: 224"
    )
    mean: list[float] | None = Field(
        None, min_length=1, max_length=3, description="imagenet/imagefolder: per-channel mean of the pixels in [0, 1] "
        "(None: ImageNet's for imagenet; measured from the training split for imagefolder and recorded here)"
    )
    std: list[float] | None = Field(
        None, min_length=1, max_length=3, description="imagenet/imagefolder: per-channel standard deviation of the "
        "pixels in [0, 1], as data.mean"
    )
    augment: bool = Field(True, description="dataset's standard training augmentation (crop + flip); false turns "
                          "augment_policy off too")
    random_labels: int = Field(0, ge=0, description="memorization: this many training images get random labels")
    num_workers: int | None = Field(
        None, ge=0, le=MAX_WORKERS, description="ImageFolder loader worker processes per training process (None: the "
        "cores this process may use, shared among the machine's ranks, minus one)"
    )
    decode: Literal["cpu", "gpu", "pil"] = Field(
        "cpu", description="ImageFolder decoding: cpu (libjpeg-turbo in the workers), gpu (nvJPEG, batched, crop on "
        "the GPU; CUDA only), pil (PIL in the workers, slower)"
    )
    max_image_pixels: int = Field(
        89_478_485, gt=0, description="ImageFolder: an image with more pixels is refused, naming the file (default: "
        "PIL's decompression-bomb bound, about 268 MB decoded)"
    )
    download: bool = Field(False, description="fetch CIFAR when the folder is missing (needs a network)")
    synthetic_size: int = Field(
        512, gt=0, le=MAX_SYNTHETIC_SIZE,
        description="training images for data.name=synthetic (val and test: a quarter as many)",
    )
    # the training recipe beyond the reference's (docs/settings.md "Recipe"); the presets leave these off
    augment_policy: Literal["none", "randaugment", "trivialaugment"] = Field(
        "none", description="torchvision's RandAugment or TrivialAugmentWide on each training image, after crop + flip"
    )
    randaugment_ops: int = Field(2, ge=1, le=14, description="RandAugment: operations per image")
    randaugment_magnitude: int = Field(9, ge=0, le=30, description="RandAugment: magnitude of each operation (0..30)")
    mixup_alpha: float = Field(0.0, ge=0, le=100, description="mixup: Beta(alpha, alpha) mixing of batch pairs (0: off)")
    cutmix_alpha: float = Field(
        0.0, ge=0, le=100, description="cutmix: Beta(alpha, alpha) area kept of each image (0: off; with mixup on too, "
        "each batch uses one of the two, chosen with even odds)"
    )

    @model_validator(mode="after")
    def _dataset_defaults(self) -> DataSettings:
        # a fixed held-out split suits a dataset of known size; a folder of your own gets one sized from it
        if self.val_size is None and self.name != "imagefolder":
            object.__setattr__(self, "val_size", DEFAULT_VAL_SIZE)
        if (self.mean is None) != (self.std is None):
            raise ValueError("data.mean and data.std go together: give both, or neither")
        if self.mean is not None and self.std is not None:
            if len(self.mean) != len(self.std):
                raise ValueError(f"data.mean has {len(self.mean)} values but data.std {len(self.std)}")
            if min(self.std) <= 0:
                raise ValueError("data.std must be positive")
        return self

    @field_validator("dir")
    @classmethod
    def _absolute_dir(cls, value: Path | None) -> Path | None:
        # a run dir's config.toml must still name the data when the job restarts in another working directory
        if value is None:
            return None
        try:
            return value.expanduser().absolute()
        except RuntimeError:  # ~name of a user that does not exist
            raise ValueError(f"cannot expand '{str(value)[:60]}': no such user's home folder") from None


class ModelSettings(_Section):
    name: str = Field(
        "digits-cnn",
        description="built-in architecture (e.g. wrn-28-10), torchvision:<name> (e.g. torchvision:resnet18) or "
        "timm:<name> (needs the timm extra)",
    )
    dropout: float | None = Field(None, ge=0, lt=1, description="dropout probability (None: the model's default)")
    weights: Path | None = Field(
        None,
        description="local pretrained weights to start from: .safetensors or a torch state dict (read with "
        "weights_only=True); stored absolute; nothing is ever downloaded",
    )
    weights_skip: list[str] = Field(
        default_factory=list,
        description="glob patterns of state-dict keys of model.weights left as initialised, e.g. ['fc.*'] for a new "
        "classifier",
    )

    @field_validator("weights")
    @classmethod
    def _absolute_weights(cls, value: Path | None) -> Path | None:
        # a resumed or relaunched run must find the file from any working directory
        return value.expanduser().absolute() if value is not None else None


class OptimSettings(_Section):
    lr: float = Field(0.1, gt=0, description="peak learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    nesterov: bool = Field(True, description="Nesterov momentum")
    weight_decay: float = Field(5e-4, ge=0, description="L2 weight decay")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing")
    lr_schedule: Literal["cosine", "step", "constant"] = Field("cosine", description="LR decay shape")
    milestones: list[int] = Field(
        default_factory=list, max_length=MAX_EPOCHS,
        description="step schedule: first epochs at each lowered LR (LR *= gamma from each on)",
    )
    gamma: float = Field(0.1, gt=0, description="step schedule: LR factor at each milestone")
    lr_warmup_epochs: float = Field(
        0.0, ge=0, le=MAX_EPOCHS,
        description="LR warm-up epochs W: epoch e < W at lr*(e+1)/W (per step: linear from 0)",
    )
    lr_per_step: bool = Field(
        False, description="set the LR at every step (continuous warm-up and decay) instead of once per epoch as the "
        "reference does"
    )
    cosine_epochs: int | None = Field(
        None, gt=0, le=MAX_EPOCHS, description="cosine period in epochs (None: schedule.epochs)"
    )
    min_lr: float = Field(0.0, ge=0, description="cosine floor")
    # the training recipe beyond the reference's (docs/settings.md "Recipe"); the presets leave these as they are
    optimizer: str = Field(
        "SGD", description="torch.optim optimizer by class name (SGD, AdamW, ...); SGD takes momentum and nesterov, "
        "any other optimizer_args"
    )
    optimizer_args: dict[str, float | bool | list[float]] = Field(
        default_factory=dict, description="more keyword arguments of the optimizer, e.g. {betas = [0.9, 0.95]}; lr "
        "and weight_decay are their own settings"
    )
    grad_accumulation: int = Field(
        1, ge=1, le=1024, description="loader batches whose gradients add up to one optimizer step (an effective "
        "batch of data.batch_size x this)"
    )
    clip_grad_norm: float | None = Field(
        None, gt=0, description="largest total 2-norm of the gradients at a step, of the weights that train (pruned "
        "ones excluded); None: no clipping"
    )
    ema_decay: float | None = Field(
        None, gt=0, lt=1, description="exponential moving average of the weights with this decay per optimizer step, "
        "evaluated every epoch and saved as ema_best_sparse / ema_best_dense (None: none)"
    )

    @model_validator(mode="after")
    def _optimizer(self) -> OptimSettings:
        if self.optimizer == "SGD" and not self.optimizer_args:
            return self
        import inspect

        import torch  # here, not at the top: most settings never name an optimizer, and torch is slow to import

        kind = getattr(torch.optim, self.optimizer, None)
        if not (isinstance(kind, type) and issubclass(kind, torch.optim.Optimizer)):
            close = difflib.get_close_matches(self.optimizer, [n for n in dir(torch.optim) if n[0].isupper()], n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"'{self.optimizer[:40]}' is not a torch.optim optimizer{hint}")
        accepted = set(inspect.signature(kind).parameters) - {"params", "lr", "weight_decay"}
        if kind is torch.optim.SGD:
            accepted -= {"momentum", "nesterov"}  # optim.momentum and optim.nesterov say those
        for key in self.optimizer_args:
            if key not in accepted:
                raise ValueError(f"{self.optimizer} takes no optimizer_args key '{key[:40]}' (it takes: "
                                 f"{', '.join(sorted(accepted)) or 'none besides lr and weight_decay'})")
        return self


class ScheduleSettings(_Section):
    method: Literal["acdc", "gmp", "dense"] = Field("acdc", description="acdc, gmp (gradual magnitude), or dense")
    epochs: int = Field(30, gt=0, le=MAX_EPOCHS, description="total training epochs")
    warmup_epochs: int = Field(
        4, ge=0, le=MAX_EPOCHS, description="acdc: dense epochs before the first compressed phase"
    )
    compressed_epochs: int = Field(3, gt=0, le=MAX_EPOCHS, description="acdc: length of each compressed (sparse) phase")
    decompressed_epochs: int = Field(
        3, gt=0, le=MAX_EPOCHS, description="acdc: length of each decompressed (dense) phase"
    )
    final_decompressed_epochs: int = Field(
        0, ge=0, le=MAX_EPOCHS, description="acdc: dense phase before the final compressed one"
    )
    final_compressed_epochs: int = Field(8, ge=0, le=MAX_EPOCHS, description="acdc: length of the final compressed phase")
    reset_momentum: Literal["restore", "every", "never"] = Field(
        "restore",
        description="when optimizer momentum is zeroed: 'restore' at each decompression (the reference), 'every' "
        "phase change, or 'never'",
    )
    gmp_start_epoch: int = Field(0, ge=0, le=MAX_EPOCHS, description="gmp: epoch of the first pruning step")
    gmp_end_epoch: int = Field(0, ge=0, le=MAX_EPOCHS, description="gmp: epoch at which target sparsity is reached")
    prune_every: int = Field(1, gt=0, le=MAX_EPOCHS, description="gmp: epochs between mask recomputations")
    start_epoch: int | str = Field(
        0,
        description="first epoch to train; 'checkpoint' continues at the --from checkpoint's epoch, so the LR "
        "schedule and phase plan carry on where it stopped (dense fine-tuning of a best_dense checkpoint)",
    )

    @field_validator("start_epoch")
    @classmethod
    def _start_epoch(cls, value: int | str) -> int | str:
        if isinstance(value, str):
            if value == "checkpoint":
                return value
            if not value.isdigit() or len(value) > 9:
                raise ValueError(f"must be an epoch number or 'checkpoint', got '{value[:40]}'")
            value = int(value)
        if not 0 <= value <= MAX_EPOCHS:
            raise ValueError(f"must be an epoch number in [0, {MAX_EPOCHS}] or 'checkpoint'")
        return value


class SparsitySettings(_Section):
    target: float = Field(
        0.9, ge=0, lt=1, description="fraction of selected weights pruned in compressed phases (N:M: 1 - N/M)"
    )
    initial: float = Field(0.05, ge=0, lt=1, description="gmp: sparsity at the first pruning step")
    structure: str = Field("unstructured", description="'unstructured' or N:M such as '2:4' (along input channels)")
    scope: Literal["global", "uniform"] = Field("global", description="one threshold for all layers, or per layer")
    include: list[str] = Field(default_factory=lambda: ["*"], description="glob patterns of prunable module names")
    exclude: list[str] = Field(default_factory=list, description="glob patterns of module names kept dense")

    @field_validator("structure")
    @classmethod
    def _structure(cls, value: str) -> str:
        if value == "unstructured":
            return value
        match = _NM.match(value)
        if not match:
            raise ValueError("must be 'unstructured' or N:M such as '2:4'")
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise ValueError(f"N:M needs 0 < N < M, got {value}")
        return value

    @property
    def n_m(self) -> tuple[int, int] | None:
        match = _NM.match(self.structure)
        return (int(match.group(1)), int(match.group(2))) if match else None

    @model_validator(mode="after")
    def _nm_target(self) -> SparsitySettings:
        # N:M fixes the sparsity at 1 - N/M: a target left out follows it, a target stated beside it must agree
        # (load_settings drops a target that a lower layer stated for another structure)
        nm = self.n_m
        if nm is None:
            return self
        implied = 1 - nm[0] / nm[1]
        if "target" in self.model_fields_set and abs(self.target - implied) > 1e-9:
            raise ValueError(f"target {self.target:g} contradicts structure {self.structure}, which prunes "
                             f"{implied:g}; leave sparsity.target out or set it to {implied:g}")
        object.__setattr__(self, "target", implied)
        return self


class RuntimeSettings(_Section):
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    seed: int = Field(0, ge=0, lt=2**62, description="seed for weights, data order, augmentation and splits")
    deterministic: bool = Field(False, description="bit-reproducible kernels (slower on GPU)")
    amp: Literal["bf16", "fp16", "off"] = Field(
        "bf16", description="autocast precision on CUDA: bf16, fp16 (with a gradient scaler) or off; CPU runs fp32"
    )
    channels_last: bool = Field(True, description="channels_last memory format on CUDA")
    compile: bool = Field(False, description="torch.compile the model (CUDA)")
    sync_batchnorm: bool = Field(False, description="SyncBatchNorm across DDP ranks (CUDA; batch statistics "
                                 "over the global batch instead of each rank's share)")
    threads: int | None = Field(
        None, gt=0, le=MAX_THREADS, description="CPU threads for torch (None: torch's default)"
    )
    eval_every: int = Field(
        1, ge=1, le=MAX_EPOCHS, description="validation pass every N epochs (plus always the last epoch of every "
        "phase); the other epochs write null for val_loss / val_top1 / val_top5"
    )
    checkpoint_every: int = Field(
        1, ge=1, le=MAX_EPOCHS, description="write last.* every N epochs (epochs); the last epoch of every phase and "
        "of the run always writes it, and best_* is written whenever an epoch beats it"
    )
    checkpoint_every_steps: int = Field(
        0, ge=0, description="also write last.* every N training steps, for mid-epoch resume (0: epoch ends only)"
    )
    nan_policy: Literal["stop", "skip"] = Field(
        "stop", description="a non-finite loss or weights: stop the run (exit 1), or skip the step (undone: weights, "
        "optimizer state, batch-norm statistics; one host sync and one copy of them per step)"
    )
    max_skipped_steps: int = Field(
        10, ge=1, le=10**6, description="nan_policy 'skip': stop the run (exit 1) after this many steps in a row "
        "are skipped (steps)"
    )
    eval_precision: Literal["fp32", "amp"] = Field(
        "fp32", description="precision of every evaluation in a run (the per-epoch passes that choose best_* and "
        "the test of best_*) and of `acdc eval`: fp32 (as the reference measured) or amp (runtime.amp's autocast)"
    )

    @property
    def eval_amp(self) -> str:
        """The autocast setting evaluations run under: "off" (fp32) or runtime.amp."""
        return self.amp if self.eval_precision == "amp" else "off"
    # clusters: the same command line starts, continues or refuses a run (torchrun restarts, requeued jobs)
    auto_resume: bool = Field(
        False, description="with --out DIR: start a new run when DIR holds none, continue it when DIR holds a "
        "resumable run of the same settings (the checks of --resume), refuse anything else; a signal's stop "
        "then exits 75 (rerun me) instead of 0"
    )

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", value):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return value


class LogSettings(_Section):
    tensorboard: bool = Field(True, description="write TensorBoard events under <run>/tb")
    per_layer: bool = Field(True, description="log per-layer sparsity to TensorBoard")
    progress: bool = Field(
        True, description="progress inside each epoch: a bar in a terminal, plain lines elsewhere (pipe, file, "
        "batch log, TERM=dumb)"
    )
    progress_interval_s: float = Field(
        30.0, ge=0, le=86_400, description="seconds between two plain progress lines when not in a terminal (0: a "
        "line after every step)"
    )
    every_steps: int = Field(
        50, ge=0, description="TensorBoard train/loss (mean since the last point) and train/lr every N training "
        "steps and at each epoch's end (0: at epoch ends only)"
    )
    # experiment tracking beside TensorBoard (training/tracking.py); each service needs its extra installed
    mlflow_uri: str | None = Field(
        None, description="MLflow tracking URI (file:PATH, sqlite:///FILE, http(s)://HOST:PORT, databricks); unset: "
        "$MLFLOW_TRACKING_URI when set, else no MLflow"
    )
    mlflow_experiment: str | None = Field(
        None, description="MLflow experiment of the run; unset: $MLFLOW_EXPERIMENT_NAME, else 'acdc'"
    )
    wandb: bool = Field(False, description="log to Weights & Biases (WANDB_* variables honoured, WANDB_MODE=offline)")
    wandb_project: str | None = Field(None, description="W&B project; unset: $WANDB_PROJECT, else 'acdc'")
    wandb_entity: str | None = Field(None, description="W&B entity (user or team); unset: $WANDB_ENTITY or yours")
    wandb_name: str | None = Field(None, description="W&B run name; unset: $WANDB_NAME, else the run dir's name")
    wandb_tags: list[str] = Field(default_factory=list, description="W&B tags of the run")
