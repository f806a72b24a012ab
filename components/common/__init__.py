"""Code every stage shares: config loading, the component contract, the artifact cache, tracking."""
