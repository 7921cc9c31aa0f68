"""GPU-hour estimates for the steps of `paws reproduce` (what DRY_RUN=1 prints), in V100-hours.

One measured number anchors everything: the paper's "100 epochs in about 8.2 hours on 64 V100" for ResNet-50
(spec section 8), i.e. 8.2 * 64 / 100 = 5.248 V100-hours per pretraining epoch of the r50 recipes. The rest is
scaled from it by compute, assuming GPUs stay compute-bound (a rough, documented estimate, not a promise):

- **Images per epoch.** A pretraining step processes, per unlabelled image, 2 large views, M small views of
  (small/large)^2 the pixels, and S/B support images (S global supports, B global batch): r50 recipes
  2 + 6 * (96/224)^2 + 6720/4096 = 4.74 "224-px image passes" per image, forward and backward. So one such
  pass costs 5.248 / (1,281,167 * 4.74) V100-hours.
- **Other methods** are counted from what they declare (``Method.data_needs`` and
  ``paws_cli.methods.sizes.global_sizes``): each of the method's views costs (its size / large size)^2 passes,
  a labelled sub-batch joining the batch adds its share of images with all their views, and a no-gradient
  target network (SemPPL's EMA target embeds the L large views) costs a forward pass, 1/3 of a pass, per view
  it embeds. SemPPL's ImageNet recipes: 4 + 2 * (96/224)^2 + 4/3 = 5.70 passes per image. The heads (MLPs) are
  left out.
- **Width.** A ResNet-50 xW has about W^2 times the FLOPs (every channel count doubles; parameters 23.5M / 94M /
  375M), so x2 costs 4x and x4 16x per image.
- **Fine-tuning** is one 224-px view per labelled image and epoch (forward and backward), plus one forward pass
  over the held-out list (12,000 images) per epoch and over the 50,000 validation images once; a forward pass
  counts 1/3 of a forward+backward one.
- **PAWS-NN** embeds the labelled bank and the 50,000 validation images once (forward only).
- Conversion and split making run on CPUs: 0 GPU-hours (the plan says how long conversion takes elsewhere).
"""

from __future__ import annotations

from paws_cli.config import Settings
from paws_cli.data.needs import needs_of
from paws_cli.method_registry import method_class
from paws_cli.methods.sizes import global_sizes

#: Paper: 100 epochs of the r50 recipe in about 8.2 h on 64 V100 (spec section 8).
V100_HOURS_PER_R50_EPOCH = 8.2 * 64 / 100
IMAGENET_TRAIN_IMAGES = 1_281_167
IMAGENET_VAL_IMAGES = 50_000
HELDOUT_IMAGES = 12_000
#: Labelled images of the official lists (spec section 10).
LABELLED_IMAGES = {"1%": 12_811, "10%": 128_116}
#: FLOPs of the backbone relative to ResNet-50 (width squared).
WIDTH_COST = {"resnet50": 1.0, "resnet50x1": 1.0, "resnet50x2": 4.0, "resnet50x4": 16.0}
#: A forward pass relative to a forward and backward pass.
FORWARD_ONLY = 1 / 3


def target_views(settings: Settings) -> int:
    """How many of the method's views (the first ones) also go through a no-gradient target network."""
    return method_class(settings.method).target_views(settings)


def passes_per_image(settings: Settings) -> float:
    """224-px-equivalent image passes (forward + backward) per unlabelled image in one pretraining step."""
    a = settings.augment
    sizes = global_sizes(settings)
    needs = needs_of(settings)
    if needs.views is None:  # PAWS's multi-crop: 2 large + M small views, and the support batch
        small = a.num_small * (a.small_size / a.large_size) ** 2
        return 2 + small + sizes.support_total / sizes.batch
    costs = [(view.size / a.large_size) ** 2 for view in needs.views]
    per_image = sum(costs) + FORWARD_ONLY * sum(costs[: target_views(settings)])
    images = 1 + sizes.sub_batch / sizes.batch  # a labelled sub-batch joins the batch with every view
    return per_image * images + sizes.support_total / sizes.batch


def _r50_reference() -> float:
    """passes_per_image of the paper's 64-GPU ResNet-50 set-up (the calibration point)."""
    return 2 + 6 * (96 / 224) ** 2 + (15 * 7 * 64) / (64 * 64)


#: V100-hours of one 224-px image pass (forward + backward) through ResNet-50.
V100_HOURS_PER_PASS = V100_HOURS_PER_R50_EPOCH / (IMAGENET_TRAIN_IMAGES * _r50_reference())


def width_cost(backbone: str) -> float:
    """Backbone FLOPs relative to ResNet-50; an error for backbones the estimate does not know."""
    try:
        return WIDTH_COST[backbone]
    except KeyError:
        raise ValueError(
            f"no GPU-hour estimate for backbone {backbone!r}; known: {', '.join(WIDTH_COST)}"
        ) from None


def pretrain_hours(settings: Settings, epochs: float) -> float:
    """V100-hours of pretraining ``epochs`` epochs of ImageNet with ``settings`` (at 224 px)."""
    per_pass = V100_HOURS_PER_PASS * width_cost(settings.model.backbone)
    return epochs * IMAGENET_TRAIN_IMAGES * passes_per_image(settings) * per_pass


def finetune_hours(settings: Settings, fraction: str) -> float:
    """V100-hours of fine-tuning on the labelled list of ``fraction`` ("1%" or "10%")."""
    per_pass = V100_HOURS_PER_PASS * width_cost(settings.model.backbone)
    epochs = settings.finetune.epochs
    passes = epochs * (LABELLED_IMAGES[fraction] + FORWARD_ONLY * HELDOUT_IMAGES)
    passes += FORWARD_ONLY * IMAGENET_VAL_IMAGES
    return passes * per_pass


def knn_eval_hours(settings: Settings, fraction: str) -> float:
    """V100-hours of PAWS-NN: embedding the labelled bank and the validation images once."""
    per_pass = V100_HOURS_PER_PASS * width_cost(settings.model.backbone)
    return FORWARD_ONLY * (LABELLED_IMAGES[fraction] + IMAGENET_VAL_IMAGES) * per_pass
