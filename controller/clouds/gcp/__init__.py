"""Google Cloud: service-account keys, their validation, the Compute Engine aggregator provider."""
