"""Category semantics: WordNet 3.0 + BERT embeddings -> K nearest categories."""
