"""Speculative decoding: proposers (n-gram, draft model) and the rejection sampler that keeps
the output exact in distribution."""
