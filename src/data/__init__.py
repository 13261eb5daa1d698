"""The data path: load -> (normalize) -> format -> tokenize with prompt masking -> pack / group -> collate."""
