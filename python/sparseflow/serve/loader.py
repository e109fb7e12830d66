"""What `sparseflow serve DIR` loads: a model saved by sparseflow (`sf.save_pretrained` or
`sparseflow convert`), or a plain transformers directory that is sparsified at start-up from a
sparsify config, plus its tokenizer. The model's kind decides the endpoints it serves."""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io._safetensors import read_safetensors_metadata
from ..model_io import WEIGHTS, from_pretrained

GENERATE, EMBED = "generate", "embed"


class LockedTokenizer:
    """A tokenizer shared by the HTTP handlers and the engine thread. Fast tokenizers change their
    padding/truncation state on each call, which races across threads, so calls take a lock."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        with self._lock:
            return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        with self._lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The model's chat template, or a plain 'role: text' transcript when it has none."""
        with self._lock:
            if getattr(self.tokenizer, "chat_template", None):
                return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id or 0)

    @property
    def eos_ids(self) -> set[int]:
        eos = self.tokenizer.eos_token_id
        return set() if eos is None else {int(eos)}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: LockedTokenizer
    kind: str  # GENERATE (causal LM) or EMBED (encoder)
    name: str
    max_positions: int
    pooling: str = "mean"
    eos_ids: set[int] = field(default_factory=set)
    info: dict[str, Any] = field(default_factory=dict)


def _sparsify_config(spec: str | None) -> dict | None:
    """--sparsify takes inline JSON or a JSON file: keyword arguments of sf.sparsify."""
    if not spec:
        return None
    text = Path(spec).read_text() if Path(spec).is_file() else spec
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--sparsify must be a JSON object or a JSON file: {e}") from None
    if not isinstance(config, dict):
        raise ValueError("--sparsify must be a JSON object of sf.sparsify arguments")
    return config


def _pooling(directory: Path) -> str:
    """sentence-transformers models say how they pool in 1_Pooling/config.json; mean otherwise."""
    config = directory / "1_Pooling" / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        if data.get("pooling_mode_cls_token"):
            return "cls"
    return "mean"


def _saved_by_sparseflow(directory: Path) -> bool:
    """Whether sf.save_pretrained wrote the weights: told by the description their own header holds
    (not by sparseflow.json, which could be missing while transformers would then load the sparse
    layers' weights as missing and initialise them at random)."""
    weights = directory / WEIGHTS
    return weights.is_file() and "sparseflow" in read_safetensors_metadata(weights)


def load_for_serving(directory: str | os.PathLike, sparsify: str | None = None, name: str | None = None,
                     dtype: str | None = None) -> LoadedModel:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    from ..sparsify import sparsify as run_sparsify

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} is not a model directory (no config.json)")
    if not any(directory.glob("tokenizer*")):
        raise FileNotFoundError(f"{directory} has no tokenizer files; serving needs them to read text")
    config = transformers.AutoConfig.from_pretrained(directory)
    sparsify_config = _sparsify_config(sparsify)
    if _saved_by_sparseflow(directory):
        if sparsify_config is not None:
            raise ValueError(f"{directory} is already sparse (saved by sparseflow); --sparsify is for dense models")
        model = from_pretrained(directory)
    else:
        arch = (config.architectures or ["AutoModel"])[0]
        cls = getattr(transformers, arch, None)
        if cls is None:
            raise ValueError(f"{directory}: unsupported model class {arch!r}")
        model = cls.from_pretrained(directory).eval()
    if dtype is not None:
        model = model.to({"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype])
    tokenizer = LockedTokenizer(transformers.AutoTokenizer.from_pretrained(directory))
    kind = GENERATE if type(model).__name__.endswith("ForCausalLM") else EMBED
    if kind == EMBED and not hasattr(model, "embeddings"):
        raise ValueError(f"{directory}: {type(model).__name__} is neither a causal LM nor an encoder; serve "
                         "supports those two")
    info: dict[str, Any] = {"class": type(model).__name__}
    if sparsify_config is not None:
        if "activation_sparsity" in sparsify_config and "calibration" not in sparsify_config:
            from ..convert import _calibration

            sparsify_config["calibration"] = _calibration(tokenizer.tokenizer, None)
        info["sparsify"] = {k: v for k, v in sparsify_config.items() if k != "calibration"}
        run_sparsify(model, **sparsify_config)
    from ..nn import ActSparseLinear, SparseLinear

    info["sparse_layers"] = sum(isinstance(m, (SparseLinear, ActSparseLinear)) for m in model.modules())
    eos = getattr(config, "eos_token_id", None)
    eos_ids = set(eos) if isinstance(eos, (list, tuple)) else ({int(eos)} if eos is not None else set())
    return LoadedModel(model=model, tokenizer=tokenizer, kind=kind, name=name or directory.resolve().name,
                       max_positions=int(getattr(config, "max_position_embeddings", 2048) or 2048),
                       pooling=_pooling(directory), eos_ids=eos_ids | tokenizer.eos_ids, info=info)
