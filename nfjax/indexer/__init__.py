"""JAX port of the PSI fast feedback indexer (ffbidx). Filled in by the indexer issue."""
