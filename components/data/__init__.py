"""Ray Data stages that turn raw image-text pairs into curated WebDataset shards."""
