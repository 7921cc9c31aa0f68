"""The one settings tree shared by every command. Each field's description doubles as CLI help (`paws settings`).

Batch and support sizes are *per process*; the run prints the resolved global values at start.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from paws_cli.method_registry import method_class, method_sections


def default_num_workers() -> int:
    """min(8, CPU cores available to this process // processes on this node), at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, min(8, cores // local))


class Section(BaseModel):
    """Base of every section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataSettings(Section):
    dataset: Literal["fashion_mnist", "array", "cifar10", "imagefolder"] = Field(
        "fashion_mnist",
        description="What the data is: 'fashion_mnist' (embedded; converted on first use), 'array' (a directory "
        "written by `paws convert-dataset fashion-mnist`, or `paws_cli.data.datasets.arrays.write_array_dataset` for your own arrays), 'cifar10' (the python-pickle folder cifar-10-batches-py) or "
        "'imagefolder' (ImageNet layout: one folder per class; or its FFCV conversion with data.format=ffcv).",
    )
    format: Literal["memory", "folder", "ffcv"] = Field(
        "memory",
        description="How it is loaded: 'memory' (the whole uint8 array in RAM, augmented on the training device; "
        "fashion_mnist, array, cifar10), 'folder' (image files decoded by PIL in DataLoader workers) or 'ffcv' (a .beton "
        "from `paws convert-dataset imagefolder`, decoded by FFCV; needs the ffcv extra).",
    )
    path: str | None = Field(
        None,
        description="Training data: the converted directory (array), the cifar-10-batches-py folder (cifar10), the "
        "ImageFolder train root (folder) or the train .beton (ffcv). For fashion_mnist, None converts into "
        "data.cache_dir.",
    )
    val_path: str | None = Field(
        None,
        description="Evaluation images for imagefolder data: the ImageFolder val root (folder) or the val .beton "
        "(ffcv). Memory datasets carry their own test split.",
    )
    num_workers: int = Field(
        default_factory=default_num_workers,
        ge=0,
        description="Data loading per training process: DataLoader worker processes (folder format) or FFCV's "
        "decoding threads (ffcv format; at least 1, at most numba's thread count). Default: the CPU cores this "
        "process may use, shared among the node's processes (LOCAL_WORLD_SIZE), at most 8.",
    )
    bad_images: Literal["skip", "stop"] = Field(
        "skip",
        description="A corrupt or truncated image met while loading: 'skip' it (replaced by another image of the "
        "batch, counted and reported) or 'stop' with an error naming the file.",
    )
    root: str | None = Field(
        None,
        description="Folder with the raw Fashion-MNIST .gz files; None looks in Debian's "
        "/usr/share/datasets/fashion-mnist.",
    )
    cache_dir: str = Field("data", description="Where datasets converted on the fly are kept.")
    split: str | None = Field(
        None,
        description="Labelled-subset split file (toolkit format or an official list). None draws a seeded "
        "class-balanced subset of data.labels_per_class images per class.",
    )
    labels_per_class: int | None = Field(
        10, ge=1, description="Labelled images per class when no split file is given."
    )
    label_percent: float | None = Field(
        None, gt=0, le=100, description="Labelled percentage per class instead of data.labels_per_class."
    )
    split_seed: int = Field(0, description="Seed of the class-balanced labelled draw.")
    ffcv_colour_ops: Literal["auto", "tensor", "opencv"] = Field(
        "auto",
        description="Where data.format=ffcv applies colour jitter/grayscale/blur: tensor = batched tensor ops on "
        "the training device; opencv = per-view uint8 OpenCV ops on the CPU (same random draws, 8-bit "
        "precision like PIL, several times cheaper on a CPU); auto = opencv when run.device is cpu, else tensor.",
    )

    @model_validator(mode="after")
    def _one_label_amount(self) -> DataSettings:
        if self.label_percent is not None and "labels_per_class" not in self.model_fields_set:
            object.__setattr__(self, "labels_per_class", None)  # a percentage replaces the default count
        if self.label_percent is not None and self.labels_per_class is not None:
            raise ValueError(
                "set only one of data.labels_per_class and data.label_percent (set the other to null)"
            )
        return self

    @model_validator(mode="after")
    def _format_fits_dataset(self) -> DataSettings:
        in_memory = self.dataset in ("fashion_mnist", "array", "cifar10")
        if in_memory and self.format != "memory":
            raise ValueError(
                f"data.format={self.format} needs data.dataset=imagefolder; data.dataset={self.dataset} is "
                "loaded into memory (set data.format=memory)"
            )
        if not in_memory and self.format == "memory":
            raise ValueError(
                "data.dataset=imagefolder is loaded with data.format=folder (image files) or data.format=ffcv (a .beton)"
            )
        if self.dataset in ("cifar10", "imagefolder", "array") and self.path is None:
            # Recipes for these datasets leave the path null on purpose: say exactly what to pass.
            example = {
                "cifar10": "data.path=/path/to/cifar-10-batches-py (the python-pickle folder)",
                "array": "data.path=/path/to/dir (made by `paws convert-dataset`)",
                "folder": "data.path=/path/to/imagenet/train (the ImageFolder train root)",
                "ffcv": "data.path=/path/to/train.beton (made by `paws convert-dataset imagefolder`)",
            }[self.format if self.dataset == "imagefolder" else self.dataset]
            raise ValueError(
                f"data.dataset={self.dataset} with data.format={self.format} needs data.path: add the override "
                f"{example}"
            )
        return self


class AugmentSettings(Section):
    large_size: int = Field(224, ge=8, description="Side of the 2 large views and the supports, in pixels.")
    size_from_data: bool = Field(
        False,
        description="Size the views from the data at run start: large_size = the images' shorter side, "
        "small_size scaled by small_size / large_size (in-memory data; a run's resolved_config.yaml records "
        "the sizes used). augment.large_size or small_size given in a higher settings layer turn it off.",
    )
    large_scale: tuple[float, float] = Field(
        (0.14, 1.0), description="RandomResizedCrop area range of large views (0.08-1.0 without multi-crop)."
    )
    num_small: int = Field(6, ge=0, description="M, the number of small (multi-crop) views per image.")
    small_size: int = Field(96, ge=8, description="Side of the small views, in pixels.")
    small_scale: tuple[float, float] = Field(
        (0.05, 0.14), description="RandomResizedCrop area range of small views."
    )
    flip_p: float = Field(0.5, ge=0, le=1, description="Horizontal flip probability.")
    jitter_strength: float = Field(
        1.0, ge=0, description="s: brightness/contrast/saturation 0.8*s, hue 0.2*s (CIFAR 0.5)."
    )
    jitter_p: float = Field(0.8, ge=0, le=1, description="Probability of applying colour jitter.")
    grayscale_p: float = Field(0.2, ge=0, le=1, description="Random grayscale probability (RGB only).")
    blur_p: float = Field(0.5, ge=0, le=1, description="Gaussian blur probability, sigma ~ U(0.1, 2.0).")
    solarize_p: float = Field(0.0, ge=0, le=1, description="Solarize probability (CIFAR recipe: 0.2).")
    equalize_p: float = Field(0.0, ge=0, le=1, description="Equalize probability (CIFAR recipe: 0.2).")
    support_views: int = Field(
        1, ge=1, description="V, augmented views per support image (ImageNet 1, CIFAR 2)."
    )

    @model_validator(mode="after")
    def _scales_are_ranges(self) -> AugmentSettings:
        for name in ("large_scale", "small_scale"):
            low, high = getattr(self, name)
            if not 0 < low <= high <= 1:
                raise ValueError(f"augment.{name} must satisfy 0 < low <= high <= 1, got ({low}, {high})")
        return self


class ModelSettings(Section):
    backbone: str = Field(
        "resnet50", description="timm model name (resnet50, resnet50x2, wrn28_2, cnn_w16, ...)."
    )
    proj_hidden_dim: int | None = Field(
        None, ge=1, description="Projection head hidden width; None = the backbone's feature width."
    )
    proj_out_dim: int = Field(2048, ge=1, description="D, the projection output width (RN50 2048, WRN 128).")
    proj_layers: int = Field(
        3, ge=0, le=3, description="Projection head Linear layers (0 disables the head)."
    )
    pred_hidden_dim: int | None = Field(
        512, ge=1, description="Prediction head hidden width (D/4 on ImageNet); null disables the head."
    )
    channels_last: bool = Field(False, description="Use channels_last memory format (faster convs on GPUs).")
    compile: bool = Field(
        False, description="torch.compile the backbone (first steps are slow while compiling)."
    )
    sync_batchnorm: bool = Field(
        True, description="Synchronise BatchNorm statistics across processes when training with several."
    )


class SupportBatchShape(Section):
    """The class-stratified labelled batch (PAWS's support batch; the supervised baseline's training batch).

    Methods that draw one hold these fields in their own section (``paws.classes_per_batch`` ...)."""

    classes_per_batch: int = Field(15, ge=1, description="K, classes per support batch, per process.")
    images_per_class: int = Field(7, ge=1, description="P, labelled images per class in a support batch.")
    unique_classes_per_rank: bool = Field(
        True, description="Each process takes its own K classes, so the global support covers K x W classes."
    )


class OptimSettings(Section):
    optimizer: Literal["lars", "sgd"] = Field("lars", description="LARS (over SGD+momentum) or plain SGD.")
    batch_size: int = Field(64, ge=1, description="Unlabelled images per process and step.")
    epochs: float | None = Field(
        100,
        gt=0,
        description="Training epochs (passes over the unlabelled set); fractions end mid-epoch. Or give the "
        "length in steps with optim.total_steps (the higher settings layer decides; null here then).",
    )
    total_steps: int | None = Field(
        None,
        ge=1,
        description="Training length in optimiser steps instead of optim.epochs (short datasets); null = epochs.",
    )
    lr: float = Field(6.4, gt=0, description="Peak learning rate, absolute for the recipe's global batch.")
    start_lr: float = Field(0.3, ge=0, description="Learning rate at the first warm-up step.")
    final_lr: float = Field(0.064, ge=0, description="Learning rate reached by the cosine at the last step.")
    warmup_epochs: float | None = Field(
        10, ge=0, description="Linear warm-up length in epochs (or optim.warmup_steps; null then)."
    )
    warmup_steps: int | None = Field(
        None,
        ge=0,
        description="Linear warm-up length in steps instead of optim.warmup_epochs; null = epochs.",
    )
    weight_decay: float = Field(
        1e-6, ge=0, description="Weight decay (not on biases and normalisation layers)."
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    nesterov: bool = Field(False, description="Nesterov momentum.")
    trust_coefficient: float = Field(0.001, gt=0, description="LARS trust coefficient.")

    def length_text(self) -> str:
        """The run's length as the settings give it: '2.5 epochs' or '300 steps'."""
        return f"{self.total_steps} steps" if self.total_steps is not None else f"{self.epochs:g} epochs"

    def warmup_text(self) -> str:
        """The warm-up's length as the settings give it: '0.2 warm-up epochs' or '20 warm-up steps'."""
        if self.warmup_steps is not None:
            return f"{self.warmup_steps} warm-up steps"
        return f"{self.warmup_epochs:g} warm-up epochs"

    @model_validator(mode="after")
    def _one_length_each(self) -> OptimSettings:
        # Steps replace the epochs' defaults; both given is an error (config.alternatives resolves the layers).
        for epochs, steps in (("epochs", "total_steps"), ("warmup_epochs", "warmup_steps")):
            if getattr(self, steps) is not None and epochs not in self.model_fields_set:
                object.__setattr__(self, epochs, None)
            if getattr(self, steps) is not None and getattr(self, epochs) is not None:
                raise ValueError(
                    f"optim.{epochs}={getattr(self, epochs)} and optim.{steps}={getattr(self, steps)} give the "
                    f"same length twice; set one (the other to null)"
                )
            if getattr(self, steps) is None and getattr(self, epochs) is None:
                raise ValueError(f"give optim.{epochs} or optim.{steps} (both are null)")
        return self

    @model_validator(mode="after")
    def _warmup_fits(self) -> OptimSettings:
        # Same units are checked here (with the keys' sources); epochs against steps when the run is built.
        pairs = ((self.warmup_epochs, self.epochs, "epochs"), (self.warmup_steps, self.total_steps, "steps"))
        for warmup, total, unit in pairs:
            if warmup is not None and total is not None and warmup > 0 and warmup >= total:
                key = "warmup_epochs" if unit == "epochs" else "warmup_steps"
                length = "epochs" if unit == "epochs" else "total_steps"
                raise ValueError(
                    f"the warm-up (optim.{key}={warmup:g}) is not shorter than training (optim.{length}="
                    f"{total:g}); lower optim.{key} or lengthen training"
                )
        return self


class RunSettings(Section):
    name: str | None = Field(None, description="Run name; the run directory is run.out_dir/run.name.")
    out_dir: str = Field("runs", description="Parent folder of run directories.")
    seed: int = Field(0, description="Seed of everything random in the run.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' picks CUDA when available.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="Autocast precision of the network (the loss is always float32). auto: bf16 on CUDA GPUs "
        "that support it (else fp16) and on CPUs with bf16 kernels (AVX512/AMX), fp32 on other CPUs, where bf16 "
        "is about 10x slower.",
    )
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads; None = all cores.")
    log_every: int = Field(10, ge=1, description="Write step metrics every N steps.")
    checkpoint_every: int = Field(
        0, ge=0, description="Also keep checkpoint-epochN.pt every N epochs (0 = only 'latest')."
    )
    checkpoint_every_steps: int = Field(
        0,
        ge=0,
        description="Also overwrite the 'latest' checkpoint every N steps inside an epoch (0 = at epoch ends "
        "only), so that a killed job loses at most N steps.",
    )
    skip_nonfinite_steps: int = Field(
        0,
        ge=0,
        description="Skip up to this many steps whose loss is not finite (no update) before stopping; 0 stops at "
        "the first.",
    )
    max_steps: int | None = Field(None, ge=1, description="Stop after this many steps (smoke tests).")
    time_budget_s: float | None = Field(
        None,
        gt=0,
        description="Wall-clock budget: the schedule runs on elapsed/budget and training stops when it is spent "
        "(used to give baselines the same budget as PAWS). Not deterministic.",
    )
    progress: bool = Field(True, description="Show the rich progress bar.")
    tensorboard: bool = Field(
        False,
        description="Also write TensorBoard event files beside metrics.jsonl (the same values at the same steps; "
        "`tensorboard --logdir runs`). Needs the tensorboard extra: pip install 'paws-cli[tensorboard]'.",
    )
    launcher: Literal["local", "slurm"] = Field(
        "local",
        description="'local': this process (or torchrun's processes); 'slurm': submit through submitit (slurm.*).",
    )
    dist_backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="torch.distributed backend; auto = NCCL on CUDA, gloo on the CPU."
    )


class SlurmSettings(Section):
    cluster: Literal["slurm", "local"] = Field(
        "slurm",
        description="submitit executor: 'slurm', or 'local' to run the same job on this machine (tests).",
    )
    nodes: int = Field(1, ge=1, description="Nodes to allocate.")
    gpus_per_node: int = Field(
        8, ge=0, description="GPUs (= processes) per node; 0 runs one CPU process per node."
    )
    cpus_per_task: int = Field(10, ge=1, description="CPU cores per process (data loading workers).")
    mem_gb: int = Field(0, ge=0, description="Memory per node in GB (0 = the partition's default).")
    partition: str | None = Field(None, description="SLURM partition.")
    account: str | None = Field(None, description="SLURM account.")
    qos: str | None = Field(None, description="SLURM quality of service.")
    constraint: str | None = Field(None, description="SLURM constraint, e.g. volta32gb.")
    time_min: int = Field(
        4320, ge=1, description="Time limit per job in minutes; the job requeues itself on time-out."
    )
    max_requeues: int = Field(
        20, ge=0, description="How many times a preempted or timed-out job is requeued."
    )
    folder: str | None = Field(None, description="submitit log folder; None = <run dir>/slurm.")


class FinetuneSettings(Section):
    mode: Literal["full", "linear"] = Field(
        "full",
        description="'full' fine-tunes the whole network (SimCLRv2 protocol); 'linear' freezes the backbone.",
    )
    epochs: float = Field(50, gt=0, description="Fine-tuning epochs over the labelled subset.")
    batch_size: int = Field(
        16, ge=1, description="Labelled images per process and step (global 1024 on ImageNet)."
    )
    lr: float = Field(0.02, gt=0, description="Peak learning rate (cosine to 0, no warm-up).")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (Nesterov).")
    nesterov: bool = Field(True, description="Nesterov momentum.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay (0 in the protocol).")
    keep_projection_layers: int = Field(
        1,
        ge=0,
        description="Projection layers kept under the classifier (1: Linear+BN+ReLU, as SimCLRv2; "
        "model.proj_layers: the whole head, whose output PAWS-NN uses when there is no prediction head).",
    )
    keep_prediction_head: bool = Field(
        False,
        description="Also keep the prediction head on top of the whole projection head (needs "
        "keep_projection_layers=model.proj_layers): the embedding nearest-neighbour evaluation uses when the "
        "checkpoint has one (SemPPL's predictor), for classifier_init=prototypes on SemPPL-NN's embedding.",
    )
    crop_scale: tuple[float, float] = Field(
        (0.08, 1.0), description="RandomResizedCrop area range of the fine-tuning augmentation (plus flip)."
    )
    val_split: str | None = Field(
        None,
        description="Held-out split for model selection (ImageNet: val.txt). None holds out "
        "finetune.val_per_class labelled images per class instead; never the test set.",
    )
    val_per_class: int = Field(
        2,
        ge=0,
        description="Labelled images per class held out for selection when no val_split; 0 trains on every "
        "labelled image (needs finetune.select=last).",
    )
    eval_every: int = Field(1, ge=1, description="Evaluate on the held-out set every N epochs.")
    select: Literal["accuracy", "loss", "last"] = Field(
        "accuracy",
        description="Which epoch's weights are tested: 'accuracy' the best held-out top-1 (SimCLRv2; ties go to "
        "the later epoch), 'loss' the lowest held-out cross-entropy, 'last' the final epoch (a fixed "
        "finetune.epochs chosen beforehand; no held-out images needed).",
    )
    backbone_lr_scale: float = Field(
        1.0,
        gt=0,
        description="Learning-rate multiplier of the pretrained layers (backbone and kept projection layers); "
        "the new classifier trains at finetune.lr. 1: one lr for all (SimCLRv2).",
    )
    classifier_init: Literal["zero", "prototypes"] = Field(
        "zero",
        description="'zero' (SimCLRv2) or 'prototypes': class c's row is the unit mean of its training images' "
        "unit features over finetune.prototype_tau (bias 0), so training starts from nearest-prototype "
        "classification instead of chance (with normalize_features, at PAWS-NN's cosine temperature).",
    )
    prototype_tau: float = Field(
        0.1,
        gt=0,
        description="Temperature of classifier_init=prototypes (PAWS-NN's eval.soft_nn_tau is 0.1).",
    )
    normalize_features: bool = Field(
        False,
        description="L2-normalise the classifier's input (a cosine classifier, as PAWS-NN compares unit "
        "embeddings); False: SimCLRv2's plain linear classifier.",
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=1, description="Label smoothing of the fine-tuning cross-entropy (0 in SimCLRv2)."
    )


class EvalSettings(Section):
    embedding: Literal["auto", "backbone", "projection", "prediction"] = Field(
        "auto", description="Embedding for nearest-neighbour evaluation; auto = prediction head if present."
    )
    soft_nn_tau: float = Field(0.1, gt=0, description="PAWS-NN temperature.")
    knn_k: int = Field(20, ge=1, description="k of the classic k-NN classifier.")
    knn_temperature: float = Field(0.07, gt=0, description="Temperature of the k-NN vote weights.")
    batch_size: int = Field(512, ge=1, description="Images per embedding batch.")
    val_images: int = Field(
        10000,
        ge=1,
        description="Validation split (`knn-eval --on val`, `paws sweep`): this many train images outside the "
        "labelled subset, val_images // classes per class (their labels are never used by training).",
    )
    val_seed: int = Field(0, description="Seed of the validation split's draw.")


class Settings(Section):
    """Everything a run needs: the shared sections below, plus one section per method under the method's name
    (``paws:``, ``supervised:``, ...; see ``paws_cli.methods``). The selected method's section is always present
    (defaults when the recipe has none); sections of other registered methods may be present and are validated.
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    method: str = Field(
        "paws",
        description="The method to train, by registered name: 'paws'; 'supervised' (the labelled-only baseline: "
        "same backbone and augmentations, cross-entropy on the labelled images); or a plug-in's. Its settings "
        "are the section of the same name.",
    )
    world_size: int = Field(1, ge=1, description="Number of processes the recipe was written for.")
    data: DataSettings = DataSettings()
    augment: AugmentSettings = AugmentSettings()
    model: ModelSettings = ModelSettings()
    optim: OptimSettings = OptimSettings()
    run: RunSettings = RunSettings()
    eval: EvalSettings = EvalSettings()
    finetune: FinetuneSettings = FinetuneSettings()
    slurm: SlurmSettings = SlurmSettings()

    @model_validator(mode="before")
    @classmethod
    def _method_sections(cls, data: Any) -> Any:
        """Validate every method section present and add the selected method's when absent."""
        if not isinstance(data, dict):
            return data
        sections = method_sections()
        name = data.get("method", cls.model_fields["method"].default)
        if not isinstance(name, str):
            raise ValueError(f"method must be a method name, got {name!r}")
        method_class(name)  # unknown names: an error with the registered names and a did-you-mean
        out = dict(data)
        for key, value in data.items():
            if key in cls.model_fields:
                continue
            if key not in sections:
                known = sorted({*cls.model_fields, *sections} - {"method", "world_size"})
                raise ValueError(f"unknown settings section {key!r}; sections: {', '.join(known)}")
            out[key] = _validate_section(key, sections[key], value)
        if name not in out:
            out[name] = sections[name]()
        return out

    def section(self, name: str) -> Section:
        """The settings section of method ``name`` (present for the selected method)."""
        extra = self.__pydantic_extra__ or {}
        if name not in extra:
            raise KeyError(f"these settings hold no '{name}:' section (method={self.method})")
        return extra[name]

    @property
    def method_settings(self) -> Section:
        """The selected method's own section."""
        return self.section(self.method)


def _validate_section(name: str, section: type[Section], value: Any) -> Section:
    if isinstance(value, section):
        return value
    if value is None:
        return section()
    try:
        return section.model_validate(value)
    except ValidationError as exc:
        # pydantic would fold a nested error into one 'Value error' line: name each key and value instead.
        problems = "; ".join(
            f"{name}.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
            + (f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else "")
            for err in exc.errors()
        )
        raise ValueError(problems) from None
