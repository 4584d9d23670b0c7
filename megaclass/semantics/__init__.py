"""Category semantics: WordNet 3.0 + BERT embeddings -> K nearest categories.

    from megaclass.semantics import read_synsets, nearest_categories, write_knn_tsv
    entries = read_synsets("info/synsets.txt")                 # [(wnid, text)], file order
    wnids = [w for w, _ in entries]
    neighbors, scores = nearest_categories(wnids, k=10, cache_dir="cache")  # int64/float32 [C, 10]
    write_knn_tsv("knn.tsv", wnids, neighbors, scores)
"""
from megaclass.semantics.encoder import TextEncoder
from megaclass.semantics.hierarchy import WuPalmer
from megaclass.semantics.knn import (
    DEFAULT_ALPHA,
    KnnFileError,
    class_embeddings,
    combined_knn,
    embedding_knn,
    nearest_categories,
    read_knn_tsv,
    topk_blockwise,
    write_knn_tsv,
)
from megaclass.semantics.synsets import (
    SynsetsError,
    check_noun_synsets,
    class_texts,
    imagenet1k_wnids,
    imagenet22k_wnids,
    read_synsets,
    select_webvision2,
    timm_info_dir,
    write_synsets,
)
from megaclass.semantics.wordnet import WordNetNotFound, synset_of, wnid_of

__all__ = [
    "DEFAULT_ALPHA", "KnnFileError", "SynsetsError", "TextEncoder", "WordNetNotFound", "WuPalmer",
    "check_noun_synsets", "class_embeddings", "class_texts", "combined_knn", "embedding_knn",
    "imagenet1k_wnids", "imagenet22k_wnids", "nearest_categories", "read_knn_tsv", "read_synsets",
    "select_webvision2", "synset_of", "timm_info_dir", "topk_blockwise", "wnid_of",
    "write_knn_tsv", "write_synsets",
]
