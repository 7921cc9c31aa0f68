"""The official split lists, shipped gzipped inside the package (CI machines and users have no other copy).

Each entry records where the list comes from and the SHA-256 of the original, uncompressed text, so a test can
prove that the shipped copy is byte-identical to it. Read them with ``paws_cli.data.splits.files.official_split``;
this module only knows the files (it imports nothing, so ``paws_cli.data.splits.files`` can import it freely).
See README.md beside this file for the provenance in prose.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: Folder holding the gzipped lists (package data).
SPLITS_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class OfficialList:
    """One shipped list: its packaged file, the original file's name and checksum, and what it is."""

    key: str
    file: str
    original_name: str
    original_sha256: str
    original_bytes: int
    num_lines: int
    source: str
    description: str

    @property
    def path(self) -> Path:
        """Absolute path of the gzipped copy."""
        return SPLITS_DIR / self.file


_SIMCLR = "google-research/simclr imagenet_subsets/{} (identical to the PAWS authors' {})"
_SUNCET = "facebookresearch/suncet {}"

#: Official lists by key. ImageNet keys name the LABELLED fraction ("1%"), unlike the authors' files, which
#: are named after the unlabelled fraction ("99percent.txt" holds the 1% labelled list).
OFFICIAL_LISTS: dict[str, OfficialList] = {
    entry.key: entry
    for entry in (
        OfficialList(
            "1%",
            "imagenet_1pct.txt.gz",
            "99percent.txt",
            "71e82a48ba78252683ae334c4d019ebd5c6e855b9599c1389fbe83eb9549cf17",
            260323,
            12811,
            _SIMCLR.format("1percent.txt", "99percent.txt"),
            "ImageNet 1% labelled training images (12-13 per class, 1000 classes)",
        ),
        OfficialList(
            "10%",
            "imagenet_10pct.txt.gz",
            "90percent.txt",
            "6d09de11e7bdaf5b1f3b1f249b6183695f97310cdd20f0c03e7235b6b9392091",
            2603168,
            128116,
            _SIMCLR.format("10percent.txt", "90percent.txt"),
            "ImageNet 10% labelled training images (contains the 1% list)",
        ),
        OfficialList(
            "val",
            "imagenet_val.txt.gz",
            "val.txt",
            "fde94a027633486479402248efb6c938763417979227555e4d541d36547a93a0",
            248760,
            12000,
            _SUNCET.format("imagenet_subsets/val.txt"),
            "ImageNet training images held out for model selection (12 per class), disjoint from 1% and 10%",
        ),
        *(
            OfficialList(
                f"cifar10-4000-{seed}",
                f"cifar10_4000_split_{seed}.txt.gz",
                f"spc.4000_split.{seed}.txt",
                sha,
                size,
                4000,
                _SUNCET.format(f"cifar10_subsets/spc.4000_split.{seed}.txt"),
                f"CIFAR-10 4000 labelled images (0-based torchvision train indices), split seed {seed}",
            )
            for seed, sha, size in (
                (73, "05ce529e1f757519038a48224685b2a5a0e0849028ddb8cf700f723dd4fc4ba6", 23119),
                (91, "11914208239f272a2f1b71b5165015f91b80b4c4a51744ab68ec1bb5f8c326d8", 23117),
                (152, "1d8b8205e36137f750b6f762d5fb52329016de12a94015b8e5949beab4f57f8c", 23118),
                (321, "df1c1eecbecdc8e783eab52ff12f8825d6a445eacda59f321b332111795bf1cb", 23131),
                (401, "737fd75cf37436bba00e1565a1667bc67e86a83207e1fe9895902d774ecc0fe5", 23042),
            )
        ),
    )
}


def official_list(key: str) -> OfficialList:
    """The shipped list for ``key`` ("1%", "10%", "val", "cifar10-4000-73", ...); a ValueError lists the keys."""
    norm = str(key).strip().lower()
    if norm in ("1", "10"):  # "--official 10" means 10%, the only sensible reading
        norm += "%"
    if norm not in OFFICIAL_LISTS:
        raise ValueError(f"no official split list {key!r}; the shipped ones are: {', '.join(OFFICIAL_LISTS)}")
    return OFFICIAL_LISTS[norm]
