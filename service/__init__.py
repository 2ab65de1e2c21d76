"""The inference service: a LitServe API that streams batched generation from the newest checkpoint."""
