"""Embedding networks: backbones, pooling, the embedding head, and the model card of a run folder."""
from ctxsim.nets.backbones import BACKBONES, build_backbone, load_weights_file
from ctxsim.nets.card import ModelCard, fingerprint, load_run, read_card, save_model
from ctxsim.nets.embedding import EmbeddingNet, ModelSpec
from ctxsim.nets.pooling import GeM, build_pooling

__all__ = ["BACKBONES", "EmbeddingNet", "GeM", "ModelCard", "ModelSpec", "build_backbone", "build_pooling",
           "fingerprint", "load_run", "load_weights_file", "read_card", "save_model"]
