"""Getting weights in and out: sparseflow's own safetensors checkpoint, legacy compressed-tensors
checkpoints, and the dense / pruned inputs that sparseflow accepts. Nothing here uses pickle."""

from .checkpoint import load_metadata, load_weights, save_weights
from .compressed_tensors import read_compressed_tensors, write_compressed_tensors
from .inputs import compress, dense_weight, parse_format, state_dict_weights

__all__ = [
    "compress", "dense_weight", "load_metadata", "load_weights", "parse_format", "read_compressed_tensors",
    "save_weights", "state_dict_weights", "write_compressed_tensors",
]
