"""The pure pieces every layer above uses: sampling, verification rules, draft-length policies, metrics,
the config schema, cost helpers, DuoDecoding's budget policy. No Ray, no gRPC (tests/test_layering.py)."""
