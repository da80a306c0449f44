"""ctxsim.data: datasets with contiguous labels, class-balanced batch samplers, transforms and loaders."""
from __future__ import annotations

from ctxsim.data.datasets import (
    IMG_EXTENSIONS,
    ImageDataset,
    ImageFolderDataset,
    ListFileDataset,
    Record,
    class_disjoint_split,
    natural_key,
    subset,
    super_class_disjoint_split,
)
from ctxsim.data.images import open_image
from ctxsim.data.digits import DigitsDataset, digits
from ctxsim.data.layouts import (
    KNOWN_DATASETS,
    cars196,
    cub200,
    inat2021,
    inat_supercategory,
    inshop,
    open_dataset,
    read_ebay_list,
    sop,
)
from ctxsim.data.omniglot import OmniglotArrays, OmniglotFolder, OmniglotZip, omniglot, omniglot_mini
from ctxsim.data.samplers import HierarchicalBatchSampler, MPerClassBatchSampler
from ctxsim.data.transforms import ConvertMode, Preprocess, eval_transform, make_loader, train_transform

__all__ = [
    "IMG_EXTENSIONS", "ImageDataset", "ImageFolderDataset", "ListFileDataset", "Record",
    "class_disjoint_split", "super_class_disjoint_split", "subset", "natural_key", "open_image",
    "DigitsDataset", "digits",
    "OmniglotZip", "OmniglotFolder", "OmniglotArrays", "omniglot", "omniglot_mini",
    "KNOWN_DATASETS", "open_dataset", "cub200", "cars196", "sop", "inshop", "inat2021", "inat_supercategory",
    "read_ebay_list",
    "MPerClassBatchSampler", "HierarchicalBatchSampler",
    "Preprocess", "ConvertMode", "train_transform", "eval_transform", "make_loader",
]
