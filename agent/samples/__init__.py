"""The device's own collection of samples worth labelling: what to keep (collector) and where (store)."""
