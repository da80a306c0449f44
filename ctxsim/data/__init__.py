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
from ctxsim.data.digits import DigitsDataset, digits
from ctxsim.data.images import open_image
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

__all__ = ["IMG_EXTENSIONS", "KNOWN_DATASETS", "ConvertMode", "DigitsDataset", "HierarchicalBatchSampler",
           "ImageDataset", "ImageFolderDataset", "ListFileDataset", "MPerClassBatchSampler", "OmniglotArrays",
           "OmniglotFolder", "OmniglotZip", "Preprocess", "Record", "cars196", "class_disjoint_split", "cub200",
           "digits", "eval_transform", "inat2021", "inat_supercategory", "inshop", "make_loader", "natural_key",
           "omniglot", "omniglot_mini", "open_dataset", "open_image", "read_ebay_list", "sop", "subset",
           "super_class_disjoint_split", "train_transform"]
