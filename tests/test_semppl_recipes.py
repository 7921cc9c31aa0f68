"""SemPPL's recipes: every number is SEMPPL-SPEC's (sections 3, 4, 9, 11), every value in the files carries a
provenance tag, world size and global batch are explicit, and `paws recipes ls` shows them.

The expected values below are typed from SEMPPL-SPEC.md (not read from the recipes), so a wrong number in a
recipe fails here. Sizes in recipes are per process; the spec states global values.
"""

from __future__ import annotations

import pytest
import yaml

from paws_cli.config import Settings, load_settings
from paws_cli.config.loader import RECIPES_DIR
from paws_cli.data.needs import needs_of
from paws_cli.methods.sizes import global_sizes
from paws_cli.reproduce.recipe_table import listed_recipes, recipe_row

TAGS = ("[PAPER]", "[3P]", "[RELEASE]", "[EXT]", "[INFERRED]")
IMAGENET = ("semppl_r50_1pct", "semppl_r50_10pct")
CIFAR = "semppl_wrn28x2_cifar10_4000"
FILES = ("_semppl_imagenet_base", *IMAGENET, CIFAR)


def _load(name: str) -> Settings:
    return load_settings(name, ["data.path=/data/placeholder"], environ={})


@pytest.mark.parametrize(
    ("name", "split", "queue"), [(IMAGENET[0], "1%", 32768), (IMAGENET[1], "10%", 65536)]
)
def test_imagenet_recipes_are_spec_9(name: str, split: str, queue: int) -> None:
    s = _load(name)
    cfg = s.section("semppl")
    assert s.method == "semppl"
    # spec 3.1: the SimCLR splits = the toolkit's official lists; spec 9: batch 4096 at the natural rate
    assert s.data.split == f"official:{split}" and s.data.labels_per_class is None
    assert (s.data.dataset, s.data.format) == ("imagefolder", "ffcv")
    assert s.world_size == 64 and s.optim.batch_size * s.world_size == 4096
    sizes = global_sizes(s)
    assert sizes.batch == 4096 and sizes.support is None and sizes.sub_batch == 0
    assert cfg.labelled_batch.classes_per_batch == 0
    # spec 4: 4 x 224 + 2 x 96, scale (0.08, 1) for both, BYOL presets per view
    a = s.augment
    assert (cfg.num_large, a.large_size, a.num_small, a.small_size) == (4, 224, 2, 96)
    assert a.large_scale == a.small_scale == (0.08, 1.0)
    assert (a.flip_p, a.jitter_p, a.grayscale_p) == (0.5, 0.8, 0.2)
    assert (a.jitter_strength * 0.8, a.jitter_strength * 0.2) == pytest.approx((0.4, 0.1))  # b/c 0.4, hue 0.1
    views = needs_of(s).views
    assert [(v.size, v.blur_p, v.solarize_p) for v in views] == [
        (224, 1.0, 0.0),
        (224, 1.0, 0.0),
        (224, 0.1, 0.2),
        (224, 0.1, 0.2),
        (96, 0.1, 0.2),
        (96, 0.1, 0.2),
    ]
    assert all(v.blur_sigma == (0.1, 2.0) and v.blur_kernel_frac == pytest.approx(0.1) for v in views)
    # spec 5 and 9: ResNet-50, BYOL projector 2048 -> 4096 -> 256 (2 layers), predictor hidden 4096
    m = s.model
    assert (m.backbone, m.proj_layers, m.proj_hidden_dim, m.proj_out_dim, m.pred_hidden_dim) == (
        "resnet50",
        2,
        4096,
        256,
        4096,
    )
    assert cfg.use_predictor and m.sync_batchnorm
    # spec 9: queues, k-NN, loss
    assert cfg.queue_size == queue
    assert (cfg.tau, cfg.num_negatives, cfg.num_positives, cfg.knn_k) == (0.1, 10, 3, 1)
    assert (cfg.c, cfg.alpha, cfg.lam) == pytest.approx((0.3, 0.2, 5.0))
    assert (cfg.knn_query, cfg.softmax_over, cfg.inv_mode, cfg.pseudo_labels) == (
        "online_pred",
        "targets",
        "swap",
        "knn",
    )
    assert cfg.ema_base == pytest.approx(0.99) and cfg.byol_presets
    # spec 9: LARS (eta 1e-3, momentum 0.9), lr 0.3 x 4096/256 after 10 warm-up epochs from 0, cosine to 0,
    # weight decay 1e-6, 300 epochs
    o = s.optim
    assert (o.optimizer, o.trust_coefficient, o.momentum, o.nesterov) == ("lars", 0.001, 0.9, False)
    assert (o.start_lr, o.lr, o.final_lr) == pytest.approx((0.0, 0.3 * 4096 / 256, 0.0))
    assert (o.warmup_epochs, o.weight_decay, o.epochs) == (10, pytest.approx(1e-6), 300)
    # spec 10.1: full fine-tuning on the same subset, selected on held-out train images (template (c))
    f = s.finetune
    assert f.mode == "full" and f.batch_size * s.world_size == 1024 and f.val_split == "official:val"
    assert (f.weight_decay, f.nesterov) == (0.0, True)


def test_cifar_recipe_is_spec_9_smaller_scale_setting() -> None:
    s = _load(CIFAR)
    cfg = s.section("semppl")
    a, o = s.augment, s.optim
    assert s.method == "semppl" and s.world_size == 1 and o.batch_size == 512
    assert (s.data.dataset, s.data.split) == ("cifar10", "official:cifar10-4000-152")  # the PAWS 4000 labels
    assert s.model.backbone == "wrn28_2"
    # L = 2 large 32 px (0.2-1), S = 2 small 16 px
    assert (cfg.num_large, a.large_size, a.large_scale, a.num_small, a.small_size) == (
        2,
        32,
        (0.2, 1.0),
        2,
        16,
    )
    assert [v.size for v in needs_of(s).views] == [32, 32, 16, 16]
    # D = 128, N_q = 4096, n_e = 10, N_sp = 3, k = 1, tau = 0.2
    assert s.model.proj_out_dim == 128
    assert (cfg.queue_size, cfg.num_negatives, cfg.num_positives, cfg.knn_k) == (4096, 10, 3, 1)
    assert cfg.tau == pytest.approx(0.2)
    # batch 512, LARS, 400-600 epochs
    assert o.optimizer == "lars" and 400 <= o.epochs <= 600 and o.epochs == 500
    assert global_sizes(s).batch == 512


@pytest.mark.parametrize("name", FILES)
def test_every_value_is_tagged_and_world_size_explicit(name: str) -> None:
    text = (RECIPES_DIR / f"{name}.yaml").read_text()
    raw = yaml.safe_load(text)
    assert raw["description"].strip()
    if not name.startswith("_"):
        assert isinstance(raw["world_size"], int)  # stated in the file itself, not only inherited
        assert "published" in raw["provenance"]
    in_provenance = False
    for line in text.splitlines():
        code, _, comment = line.partition("#")
        if not code.strip():
            continue  # blank or a comment line
        if not line.startswith(" "):  # a top-level key
            in_provenance = code.startswith("provenance:")
        key, _, value = code.strip().partition(":")
        if in_provenance or key in ("description", "base", "method") or not value.strip():
            continue  # the provenance block itself, and section headers
        if value.strip() == "null" and key in ("path", "val_path"):
            continue  # left to the user, as the comment above the key says
        assert any(tag in comment for tag in TAGS), f"{name}: untagged value `{line.strip()}`"


def test_recipes_ls_rows() -> None:
    assert (
        set(IMAGENET) | {CIFAR} <= set(listed_recipes()) and "_semppl_imagenet_base" not in listed_recipes()
    )
    row = recipe_row("semppl_r50_10pct")
    assert (row.model, row.labels, row.world_size, row.global_batch, row.global_support, row.schedule) == (
        "resnet50",
        "10%",
        64,
        4096,
        "none",
        "300 epochs",
    )
    assert recipe_row("semppl_fmnist_demo").global_support == "sub-batch 10"
    assert recipe_row("r50_1pct").global_support == "960 x 7"
